"""Runner: per scenario, start a fresh server per stack pinned to one core, drive them with the load
generator pinned to another, collect the figures, print Markdown tables and write a JSON file.

``python -m bench --help`` lists the options; ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any, cast

from .report import failures, markdown
from .scenarios import (
    CLUSTER_STACKS,
    FULL,
    FULL_TIMING,
    QUICK,
    QUICK_STACKS,
    QUICK_TIMING,
    REDIS_STACKS,
    REFERENCE,
    STACKS,
    Scenario,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PACKAGES = (
    "rtbroadcast",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "websockets",
    "broadcaster",
    "redis",
    "picows",
    "orjson",
    "pydantic",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Fan-out benchmark of rtbroadcast against raw websockets, naive Starlette and "
        "encode/broadcaster. Prints Markdown tables, writes bench/results/<time>.json.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run in under a minute: fewer stacks, smaller scenarios, shorter phases",
    )
    parser.add_argument("--stacks", help=f"comma-separated subset of: {', '.join(STACKS)}")
    parser.add_argument("--scenarios", help="comma-separated scenario names (see bench/README.md)")
    parser.add_argument("--server-cpu", type=int, default=0, help="core for the server (default 0)")
    parser.add_argument("--loadgen-cpu", type=int, default=1, help="core for the load generator (default 1)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--cluster-url",
        help="redis+cluster://host:port,... for the rtbroadcast-cluster stack (skipped without it); "
        "`python -m bench.cluster` starts a throwaway one",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds of trials per stack (full 3, quick 1)")
    parser.add_argument("--rate-seconds", type=float, help="length of one fixed-rate latency trial")
    parser.add_argument("--sat-seconds", type=float, help="length of one saturation trial")
    parser.add_argument("--out", type=Path, help="JSON output path (default bench/results/...)")
    return parser.parse_args(argv)


# -- process handling ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(cpu: int | None) -> Any:
    """A ``preexec_fn`` that pins the child to ``cpu`` and raises its open-files limit."""

    def setup() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return setup


def wait_for_ports(proc: subprocess.Popen[bytes], ports: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending and time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5):
                pending.pop(0)
        except OSError:
            time.sleep(0.05)
    return not pending


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- machine noise ---------------------------------------------------------------------------------

_SPIN = """
import json, os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
counts, end = [], time.perf_counter() + float(sys.argv[2])
while time.perf_counter() < end:
    stop, n = time.perf_counter() + 0.05, 0
    while time.perf_counter() < stop:
        for _ in range(200):
            pass
        n += 1
    counts.append(n)
print(json.dumps(counts))
"""


def cpu_noise(cores: list[int], seconds: float = 2.0) -> dict[str, dict[str, int]]:
    """Spin on every core at once in 50 ms slices: how steady is the CPU we get?

    On a shared host the same loop runs at very different speeds from one slice to the next; the
    median and slowest slice, as a percentage of the fastest, tell how far to trust small
    differences.
    """
    procs = [
        subprocess.Popen([sys.executable, "-c", _SPIN, str(core), str(seconds)], stdout=subprocess.PIPE)
        for core in cores
    ]
    result = {}
    for core, proc in zip(cores, procs, strict=True):
        out, _ = proc.communicate(timeout=seconds + 30)
        counts = json.loads(out)
        best = max(counts) or 1
        result[str(core)] = {
            "median_pct": round(100 * statistics.median(counts) / best),
            "slowest_pct": round(100 * min(counts) / best),
        }
    return result


# -- redis -----------------------------------------------------------------------------------------


def redis_info(url: str) -> dict[str, Any] | None:
    """Version and pid of the Redis server at ``url``, or ``None`` when it does not answer."""
    try:
        import redis
    except ImportError:
        return None
    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        info = cast(dict[str, Any], client.info("server"))
        client.close()
    except (redis.RedisError, OSError):
        return None
    pid = int(info.get("process_id", 0))
    return {
        "version": info.get("redis_version"),
        "pid": pid if pid and Path(f"/proc/{pid}").exists() else 0,
    }


def redis_cleanup(url: str, marker: str) -> int:
    """Delete the keys this run created (their names contain ``marker``); never anything else."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    deleted = 0
    try:
        batch: list[bytes] = []
        for i, key in enumerate(client.scan_iter(match=f"*{marker}*", count=1000)):
            batch.append(key)
            if len(batch) >= 500:
                deleted += cast(int, client.delete(*batch))
                batch.clear()
            if i > 1_000_000:  # bounded, whatever happens
                break
        if batch:
            deleted += cast(int, client.delete(*batch))
    finally:
        client.close()
    return deleted


def cluster_cleanup(url: str, marker: str) -> int:
    """Delete this run's keys on every primary of the cluster at ``url``."""
    import redis

    deleted = 0
    for node in url.split("://", 1)[1].split("?", 1)[0].strip("/").split(","):
        host, _, port = node.rpartition(":")
        client = redis.Redis(host=host, port=int(port), socket_timeout=5)
        try:
            if client.info("replication").get("role") == "master":
                deleted += redis_cleanup(f"redis://{host}:{port}/0", marker)
        except (redis.RedisError, OSError):
            continue
        finally:
            client.close()
    return deleted


# -- one scenario, every stack ---------------------------------------------------------------------


def start_server(
    stack: str, args: argparse.Namespace, log_path: Path
) -> tuple[subprocess.Popen[bytes], int, int]:
    port = free_port()
    http_port = free_port() if stack == REFERENCE else port
    cmd = [sys.executable, "-m", "bench.servers", stack, "--port", str(port)]
    if stack == REFERENCE:
        cmd += ["--http-port", str(http_port)]
    if stack in REDIS_STACKS:
        cmd += ["--redis-url", args.redis_url]
    if stack in CLUSTER_STACKS:
        cmd += ["--cluster-url", args.cluster_url]
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=pinned(args.server_cpu),
        )
    return server, port, http_port


def fd_budget() -> int:
    """File descriptors the load generator may use (it raises its soft limit to the hard one)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return 1_000_000
    return max(1024, hard - 512)


def plan_groups(scenario: Scenario, stacks: list[str], budget: int) -> list[list[str]]:
    """Split the stacks into groups whose connections fit in the load generator's descriptors.

    Every group starts with the reference, so each stack is compared with a reference measured
    alongside it. Usually everything fits in one group.
    """
    per_target = scenario.subscribers + scenario.publishers + 16
    others = [s for s in stacks if s != REFERENCE]
    with_ref = REFERENCE in stacks
    room = max(1, budget // per_target - (1 if with_ref else 0))
    if scenario.idle or len(others) <= room:
        return [stacks]
    # rtbroadcast's stacks first: the target of the benchmark is measured in the first group.
    others.sort(key=lambda s: not s.startswith("rtbroadcast"))
    chunks = [others[i : i + room] for i in range(0, len(others), room)]
    return [([REFERENCE] if with_ref else []) + chunk for chunk in chunks]


def reference_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The reference's figures that ratios divide by."""
    rate = result.get("rate", {}).get("last_device_ms") or {}
    return {
        "deliveries_per_s": result.get("saturation", {}).get("deliveries_per_s"),
        "p99_ms": rate.get("p99"),
        "kib_per_connection": result.get("kib_per_connection"),
    }


def run_scenario(
    scenario: Scenario,
    stacks: list[str],
    args: argparse.Namespace,
    timing: dict[str, float],
    run_id: str,
    redis: dict[str, Any] | None,
    logs: Path,
) -> list[dict[str, Any]]:
    """Run the scenario for every stack, in as few groups as the load generator's descriptors allow.

    The reference's record is the first group's; every other stack carries the reference figures of
    its own group under ``reference``.
    """
    groups = plan_groups(scenario, stacks, fd_budget())
    by_stack: dict[str, dict[str, Any]] = {}
    for index, group in enumerate(groups):
        if len(groups) > 1:
            print(f"  group {index + 1}/{len(groups)}: {', '.join(group)}", file=sys.stderr)
        records = run_group(scenario, group, args, timing, run_id, redis, logs)
        ref = next((r for r in records if r["stack"] == REFERENCE and r["status"] == "ok"), None)
        for record in records:
            record["group"] = index
            if record["stack"] == REFERENCE:
                by_stack.setdefault(REFERENCE, record)
                continue
            if ref is not None:
                record["reference"] = reference_figures(ref["result"])
            by_stack[record["stack"]] = record
    return [by_stack[s] for s in stacks if s in by_stack]


def run_group(
    scenario: Scenario,
    stacks: list[str],
    args: argparse.Namespace,
    timing: dict[str, float],
    run_id: str,
    redis: dict[str, Any] | None,
    logs: Path,
) -> list[dict[str, Any]]:
    """Start one server per stack, drive them all with one load generator, stop them."""
    records: dict[str, dict[str, Any]] = {
        s: {"scenario": scenario.name, "stack": s, "status": "error"} for s in stacks
    }
    servers: dict[str, subprocess.Popen[bytes]] = {}
    targets: list[dict[str, Any]] = []
    try:
        ports: dict[str, tuple[int, int]] = {}
        for stack in stacks:
            server, port, http_port = start_server(stack, args, logs / f"{scenario.name}-{stack}.log")
            servers[stack] = server
            ports[stack] = (port, http_port)
        for stack in stacks:
            server = servers[stack]
            port, http_port = ports[stack]
            if not wait_for_ports(server, sorted({port, http_port}), timeout=30):
                records[stack]["error"] = "server did not start"
                records[stack]["server_log"] = tail(logs / f"{scenario.name}-{stack}.log")
                continue
            # Channel names carry the run id, so Redis keys never collide with anything else.
            tag = f"rtbench-{run_id}-{stack}-{scenario.name}"
            targets.append(
                {
                    "name": stack,
                    "ws_url": f"ws://127.0.0.1:{port}/ws",
                    "http_port": http_port,
                    "channels": [f"{tag}-{i}" for i in range(scenario.channels)],
                    "server_pid": server.pid,
                    "redis_pid": (redis or {}).get("pid", 0) if stack in REDIS_STACKS else 0,
                }
            )
        if not targets:
            return list(records.values())
        config = {
            "targets": targets,
            "subs_per_channel": scenario.subs_per_channel,
            "slow_per_channel": scenario.slow_per_channel,
            "deflate": scenario.deflate,
            "publishers": scenario.publishers,
            "window": scenario.window,
            "rate": 0.0 if scenario.idle else scenario.rate,
            "rate_seconds": timing["rate"],
            "sat_seconds": 0.0 if scenario.idle else timing["saturation"],
            "rounds": int(timing["rounds"]),
            "idle_seconds": scenario.idle_seconds,
            "verify": scenario.idle,
        }
        n = len(targets)
        trials = (
            0.0
            if scenario.idle
            else timing["rounds"] * n * (timing["rate"] * 1.5 + 1 + timing["saturation"] + 2 * 2)
            + (n * 15 if scenario.slow_per_channel else 0)
        )
        connects = n * (20 + scenario.subscribers / 500 + scenario.idle_seconds + 15)
        budget = 60 + connects + trials + 3 * 15
        try:
            done = subprocess.run(
                [sys.executable, "-m", "bench.loadgen", "-"],
                cwd=ROOT,
                input=json.dumps(config).encode(),
                stdout=subprocess.PIPE,
                timeout=budget,
                preexec_fn=pinned(args.loadgen_cpu),
                check=False,
            )
        except subprocess.TimeoutExpired:
            for t in targets:
                records[t["name"]]["error"] = f"load generator exceeded {budget:.0f}s"
            return list(records.values())
        lines = done.stdout.decode().strip().splitlines()
        if done.returncode != 0 or not lines:
            for t in targets:
                records[t["name"]]["error"] = f"load generator exited with {done.returncode}"
            return list(records.values())
        results = json.loads(lines[-1])["targets"]
        for t in targets:
            stack = t["name"]
            record = records[stack]
            record["result"] = results[stack]
            if servers[stack].poll() is not None:
                record["error"] = f"server exited with {servers[stack].returncode} during the run"
            else:
                record["status"] = "ok"
        return list(records.values())
    finally:
        for stack, server in servers.items():
            stop(server)
            if records[stack]["status"] != "ok" and "server_log" not in records[stack]:
                records[stack]["server_log"] = tail(logs / f"{scenario.name}-{stack}.log")
        if redis is not None and any(s in REDIS_STACKS for s in stacks):
            with contextlib.suppress(Exception):
                deleted = redis_cleanup(args.redis_url, f"rtbench-{run_id}")
                for stack in stacks:
                    if stack in REDIS_STACKS:
                        records[stack]["redis_keys_deleted"] = deleted
        if args.cluster_url and any(s in CLUSTER_STACKS for s in stacks):
            with contextlib.suppress(Exception):
                deleted = cluster_cleanup(args.cluster_url, f"rtbench-{run_id}")
                for stack in stacks:
                    if stack in CLUSTER_STACKS:
                        records[stack]["redis_keys_deleted"] = deleted


# -- the whole run ---------------------------------------------------------------------------------


def select(names: str | None, available: dict[str, Any] | list[str], what: str) -> list[str] | None:
    if names is None:
        return None
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; choose from {', '.join(available)}")
    return chosen


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "packages": versions,
        "commit": commit,
    }


def stacks_available(
    wanted: list[str], explicit: bool, redis: dict[str, Any] | None, cluster_url: str | None = None
) -> tuple[list[str], dict[str, str]]:
    skipped: dict[str, str] = {}
    try:
        metadata.version("rtbroadcast")
        import rtbroadcast.starlette  # noqa: F401
    except (metadata.PackageNotFoundError, ImportError) as exc:
        for stack in wanted:
            if stack.startswith("rtbroadcast"):
                skipped[stack] = f"rtbroadcast not importable ({exc}); pip install -e '.[bench]'"
    if redis is None:
        for stack in wanted:
            if stack in REDIS_STACKS:
                skipped.setdefault(stack, "no Redis answering at --redis-url")
    if not cluster_url:
        for stack in wanted:
            if stack in CLUSTER_STACKS:
                skipped.setdefault(stack, "no --cluster-url given")
    if explicit and skipped:
        raise SystemExit("cannot run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return [s for s in wanted if s not in skipped], skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = QUICK if args.quick else FULL
    by_name = {s.name: s for s in (*FULL, *QUICK)}
    chosen_scenarios = select(args.scenarios, list(by_name), "scenario")
    if chosen_scenarios is not None:
        scenarios = tuple(by_name[name] for name in chosen_scenarios)
    wanted = select(args.stacks, STACKS, "stack") or list(QUICK_STACKS if args.quick else STACKS)
    redis = redis_info(args.redis_url)
    stacks, skipped = stacks_available(wanted, args.stacks is not None, redis, args.cluster_url)
    timing = dict(QUICK_TIMING if args.quick else FULL_TIMING)
    for key, value in (
        ("rounds", args.rounds),
        ("rate", args.rate_seconds),
        ("saturation", args.sat_seconds),
    ):
        if value is not None:
            timing[key] = value
    cpus = sorted(os.sched_getaffinity(0))
    if args.server_cpu not in cpus or args.loadgen_cpu not in cpus:
        raise SystemExit(f"--server-cpu/--loadgen-cpu must be among the usable cores {cpus}")
    if args.server_cpu == args.loadgen_cpu:
        print("warning: server and load generator share a core", file=sys.stderr)
    # The runner itself waits on the load generator's core, away from the server.
    os.sched_setaffinity(0, {args.loadgen_cpu})

    run_id = secrets.token_hex(3)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"{stamp}{'-quick' if args.quick else ''}.json"
    logs = RESULTS / "logs" / stamp
    logs.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "date": stamp,
        "mode": "quick" if args.quick else "full",
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "redis": redis,
        "server_cpu": args.server_cpu,
        "loadgen_cpu": args.loadgen_cpu,
        "timing": timing,
        "scenarios": [asdict(s) for s in scenarios],
        "stacks": stacks,
        "skipped": skipped,
    }
    for stack, why in skipped.items():
        print(f"skipping {stack}: {why}", file=sys.stderr)

    runs: list[dict[str, Any]] = []
    cores = sorted({args.server_cpu, args.loadgen_cpu})
    spin = 1.0 if args.quick else 2.0
    meta["noise"] = {"start": cpu_noise(cores, spin)}
    started = time.monotonic()
    for scenario in scenarios:
        print(f"[{time.monotonic() - started:5.0f}s] {scenario.name}", file=sys.stderr)
        for record in run_scenario(scenario, stacks, args, timing, run_id, redis, logs):
            if record["status"] != "ok":
                print(
                    f"  ERROR {record['stack']}: {record.get('error')}\n{record.get('server_log', '')}",
                    file=sys.stderr,
                )
            runs.append(record)
    meta["seconds"] = round(time.monotonic() - started, 1)
    meta["noise"]["end"] = cpu_noise(cores, spin)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
    print(markdown(meta, runs))
    print(f"\nJSON: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    problems = failures(runs)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0
