"""Turn the runner's records into Markdown tables, and find what counts as a failure."""

from __future__ import annotations

import statistics
from typing import Any

from .scenarios import DEFLATE_BASELINE, REFERENCE, SLOW_BASELINE

MiB = 1024 * 1024

#: Integrity counters that must all be zero for every normal subscriber.
MUST_BE_ZERO = (
    "lost",
    "duplicated",
    "reordered",
    "seq_gaps",
    "seq_backwards",
    "disconnected",
    "http_errors",
    "connect_errors",
    "incomplete",
)


def failures(runs: list[dict[str, Any]]) -> list[str]:
    """Every run that errored or whose normal subscribers saw a loss, duplicate or reorder."""
    problems = []
    for run in runs:
        where = f"{run['scenario']} / {run['stack']}"
        if run["status"] != "ok":
            problems.append(f"{where}: {run.get('error', 'failed')}")
            continue
        result = run["result"]
        normal = result["integrity"]["normal"]
        bad = {k: normal[k] for k in MUST_BE_ZERO if normal.get(k)}
        if result["connect"].get("not_ready"):
            bad["not_ready"] = result["connect"]["not_ready"]
        if bad:
            problems.append(f"{where}: " + ", ".join(f"{k}={v}" for k, v in bad.items()))
    return problems


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None, reference: float | None) -> str:
    if not value or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def _ms(latency: dict[str, float] | None, key: str) -> float | None:
    if not latency:
        return None
    return latency.get(key)


def _integrity(result: dict[str, Any]) -> str:
    normal = result["integrity"]["normal"]
    text = f"{normal['lost']}/{normal['duplicated']}/{normal['reordered']}"
    extra = [k for k in MUST_BE_ZERO[3:] if normal.get(k)]
    if extra:
        text += " (" + ", ".join(f"{k} {normal[k]}" for k in extra) + ")"
    return text


def _stalled(result: dict[str, Any]) -> bool:
    return any(result.get(kind, {}).get("stalled") for kind in ("rate", "saturation"))


def _deliveries(result: dict[str, Any]) -> str:
    sat = result.get("saturation", {})
    if _stalled(result) and len(sat.get("trials", ())) < 2:
        return "stalled"
    return _num(sat.get("deliveries_per_s"))


def per_cpu_second(sat: dict[str, Any]) -> float | None:
    """Deliveries per second of server CPU time: median over trials.

    On a shared machine the server process gets anything between a quarter and all of its core, which
    moves deliveries/s by 2-4x between trials; what one delivery costs the server in CPU moves far less.
    """
    values = [
        t["deliveries"] / (t["server_cpu"] / 100 * t["seconds"])
        for t in sat.get("trials", ())
        if t.get("server_cpu") and t.get("seconds") and t.get("deliveries")
    ]
    return statistics.median(values) if values else None


def _spread(sat: dict[str, Any]) -> str:
    if len(sat.get("trials", ())) < 2:
        return "-"
    return f"{sat['deliveries_per_s_min'] / 1000:.0f}k-{sat['deliveries_per_s_max'] / 1000:.0f}k"


def _busy(sat: dict[str, Any], meta: dict[str, Any]) -> str:
    busy = sat.get("core_busy") or {}
    server = busy.get(str(meta["server_cpu"]))
    loadgen = busy.get(str(meta["loadgen_cpu"]))
    return f"{_num(server)}/{_num(loadgen)}"


def _noise(meta: dict[str, Any]) -> str:
    noise = meta.get("noise") or {}
    parts = []
    for when in ("start", "end"):
        cores = noise.get(when) or {}
        if cores:
            figures = ", ".join(
                f"core {core} median {v['median_pct']}% / slowest {v['slowest_pct']}%"
                for core, v in cores.items()
            )
            parts.append(f"{when}: {figures}")
    if not parts:
        return ""
    return (
        "CPU steadiness (a spin loop per core in 50 ms slices, as % of its fastest slice; "
        "100% = a quiet machine): " + "; ".join(parts) + "."
    )


def _index(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["scenario"], r["stack"]): r["result"] for r in runs if r["status"] == "ok"}


def markdown(meta: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    by_key = _index(runs)
    scenarios = [s for s in meta["scenarios"]]
    machine = meta["machine"]
    timing = meta["timing"]
    lines = [
        f"## rtbroadcast fan-out benchmark ({meta['mode']} run, {meta['date']})",
        "",
        f"Machine: {machine['cores']} cores ({machine['cpu']}), Python {machine['python']}, "
        f"server on core {meta['server_cpu']}, load generator on core {meta['loadgen_cpu']}. "
        f"{timing['rounds']:g} interleaved round(s) per scenario; per stack and round one "
        f"{timing['rate']:g}s latency trial at a fixed rate and one {timing['saturation']:g}s "
        f"saturation trial. Deliveries/s is the median over rounds. Ratios divide by `{REFERENCE}` "
        "in the same scenario of this run.",
        "",
        _noise(meta),
        "",
        "| Scenario | Stack | Deliveries/s | min-max | vs raw | Per CPU-s | vs raw | p50 ms | p99 ms "
        "| p99 vs raw | Peak RSS MiB | KiB/conn | Lost/dup/reord | Core busy srv/gen % |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for scenario in scenarios:
        if scenario["idle_seconds"]:
            continue
        name = scenario["name"]
        ref = by_key.get((name, REFERENCE), {})
        scenario_ref_sat = ref.get("saturation", {}).get("deliveries_per_s")
        ref_cpu = per_cpu_second(ref.get("saturation", {}))
        scenario_ref_p99 = _ms(ref.get("rate", {}).get("last_device_ms"), "p99")
        label = f"{name} @{scenario['rate']:g} ev/s"
        for run in runs:
            if run["scenario"] != name:
                continue
            stack = run["stack"]
            own_ref = run.get("reference") or {}
            ref_sat = own_ref.get("deliveries_per_s", scenario_ref_sat)
            ref_p99 = own_ref.get("p99_ms", scenario_ref_p99)
            if run["status"] != "ok":
                lines.append(f"| {label} | {stack} | error: {run.get('error')} ||||||||||||")
                continue
            result = run["result"]
            sat = result.get("saturation", {})
            lat = result.get("rate", {}).get("last_device_ms")
            p99 = _ms(lat, "p99")
            cpu = per_cpu_second(sat)
            lines.append(
                f"| {label} | {stack} | {_deliveries(result)} | {_spread(sat)} "
                f"| {_ratio(sat.get('deliveries_per_s'), ref_sat)} "
                f"| {_num(cpu)} | {_ratio(cpu, None if run.get('group') else ref_cpu)} "
                f"| {_num(_ms(lat, 'p50'), 2)} | {_num(p99, 2)} | {_ratio(p99, ref_p99)} "
                f"| {_num(result['rss']['peak'] / MiB, 1)} "
                f"| {_num(result['kib_per_connection'], 1)} "
                f"| {_integrity(result)} "
                f"| {_busy(sat, meta)} |"
            )
    split = sorted({r["scenario"] for r in runs if r.get("group")})
    if split:
        lines += [
            "",
            f"{', '.join(split)}: too many connections for one load generator at once, so the stacks "
            "ran in groups, each with its own raw-websockets; every ratio divides by the reference of "
            "the same group (the raw row shows the first group).",
        ]
    lines += _slow_table(scenarios, runs, by_key)
    lines += _deflate_table(scenarios, runs, by_key)
    lines += _idle_table(scenarios, runs, by_key)
    return "\n".join(lines)


def _deflate_table(
    scenarios: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    by_key: dict[tuple[str, str], dict[str, Any]],
) -> list[str]:
    names = [s["name"] for s in scenarios if s.get("deflate") and s["name"] in DEFLATE_BASELINE]
    if not names:
        return []
    lines = [
        "",
        "Compression: the same fan-out with subscribers that offer permessage-deflate, as browsers do, "
        "next to the run without, in deliveries per second of server CPU (`Per CPU-s`, steadier than "
        "deliveries/s on a shared machine). `Accepted` counts the subscribers whose offer the server "
        "accepted.",
        "",
        "| Subscribers | Stack | Per CPU-s plain | offering deflate | with/without | vs raw plain "
        "| vs raw offering | KiB/conn plain | offering | Accepted |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        base = DEFLATE_BASELINE[name]

        def cpu(scenario: str, stack: str) -> float | None:
            return per_cpu_second(by_key.get((scenario, stack), {}).get("saturation", {}))

        for run in runs:
            if run["scenario"] != name or run["status"] != "ok":
                continue
            stack = run["stack"]
            result = run["result"]
            plain = by_key.get((base, stack), {})
            with_, without = cpu(name, stack), cpu(base, stack)
            connect = result.get("connect", {})
            lines.append(
                f"| {connect.get('subscribers', '')} | {stack} | {_num(without)} | {_num(with_)} "
                f"| {_ratio(with_, without)} | {_ratio(without, cpu(base, REFERENCE))} "
                f"| {_ratio(with_, cpu(name, REFERENCE))} "
                f"| {_num(plain.get('kib_per_connection'), 1)} | {_num(result.get('kib_per_connection'), 1)} "
                f"| {_num(connect.get('deflate_accepted'))} |"
            )
    return lines


def _slow_table(
    scenarios: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    by_key: dict[tuple[str, str], dict[str, Any]],
) -> list[str]:
    slow_names = [s["name"] for s in scenarios if s["slow_per_channel"]]
    if not slow_names:
        return []
    lines = [
        "",
        "Slow reader: figures of the other subscribers. `vs raw` is relative to raw-websockets in "
        "the same scenario (raw's broadcast() never waits for a socket); `w/o slow` is the same "
        "ratio in the scenario without a slow reader, so equal ratios mean the slow reader cost "
        "nothing.",
        "",
        "| Scenario | Stack | Deliveries/s | vs raw | w/o slow | p99 ms | p99 vs raw | w/o slow "
        "| Slow reader received | Slow reader closed (code) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in slow_names:
        base_name = SLOW_BASELINE.get(name, "")

        def figures(scenario: str, stack: str) -> tuple[float | None, float | None]:
            result = by_key.get((scenario, stack), {})
            return (
                result.get("saturation", {}).get("deliveries_per_s"),
                _ms(result.get("rate", {}).get("last_device_ms"), "p99"),
            )

        ref_sat, ref_p99 = figures(name, REFERENCE)
        base_ref_sat, base_ref_p99 = figures(base_name, REFERENCE)
        for run in runs:
            if run["scenario"] != name or run["status"] != "ok":
                continue
            result = run["result"]
            sat, p99 = figures(name, run["stack"])
            base_sat, base_p99 = figures(base_name, run["stack"])
            slow = result["integrity"].get("slow", {})
            codes = slow.get("close_codes") or {}
            closed = ", ".join(f"{n} ({code})" for code, n in codes.items()) or "no"
            lines.append(
                f"| {name} | {run['stack']} | {_deliveries(result)} | {_ratio(sat, ref_sat)} "
                f"| {_ratio(base_sat, base_ref_sat)} | {_num(p99, 2)} | {_ratio(p99, ref_p99)} "
                f"| {_ratio(base_p99, base_ref_p99)} "
                f"| {_num(slow.get('received'))} of {_num(slow.get('expected'))} | {closed} |"
            )
    return lines


def _idle_table(
    scenarios: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    by_key: dict[tuple[str, str], dict[str, Any]],
) -> list[str]:
    idle = [s for s in scenarios if s["idle_seconds"]]
    if not idle:
        return []
    lines = [
        "",
        "Idle connections: memory per connection, then one event per channel to check every "
        "connection still delivers.",
        "",
        "| Scenario | Stack | Connections | RSS before MiB | RSS idle MiB | KiB/conn | vs raw "
        "| Connect s | Lost/dup/reord |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for scenario in idle:
        name = scenario["name"]
        ref = by_key.get((name, REFERENCE), {}).get("kib_per_connection")
        for run in runs:
            if run["scenario"] != name:
                continue
            if run["status"] != "ok":
                lines.append(f"| {name} | {run['stack']} | error: {run.get('error')} |||||||")
                continue
            result = run["result"]
            rss = result["rss"]
            lines.append(
                f"| {name} | {run['stack']} | {_num(result['connect']['subscribers'])} "
                f"| {_num(rss['base'] / MiB, 1)} "
                f"| {_num(rss.get('idle', rss['connected']) / MiB, 1)} "
                f"| {_num(result['kib_per_connection'], 1)} "
                f"| {_ratio(result['kib_per_connection'], ref)} "
                f"| {_num(result['connect']['seconds'], 1)} | {_integrity(result)} |"
            )
    return lines
