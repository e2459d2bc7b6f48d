"""Protocol 2 against protocol 1: the same deliveries, through many subscriptions per connection or one each.

``python -m bench.multichannel`` starts two rtbroadcast servers (memory backend, the docs' uvicorn settings)
pinned to one core with ``taskset``, and drives both from this process, pinned to another core:

- **protocol 2**: ``--connections`` (1,000) WebSocket connections, each subscribed to
  ``--per-connection`` (10) of ``--channels`` (1,000) channels: 10,000 subscriptions;
- **protocol 1**: one connection per subscription of the first (10,000 connections), to the same channels:
  every event goes to exactly as many subscribers on both.

Each round asks both servers, in turn (the order rotated), to publish ``--events`` events to channels
drawn from the same seeded generator (in batches, yielding to the loop between them), and waits until
every subscriber has every event; every frame is parsed and its ``seq`` checked per subscription (a gap,
repeat or step back is counted and fails the run). Reported per protocol: deliveries per second of wall
time and per second of server CPU (``user + system`` of the server process, from ``psutil``; the
client's own speed does not enter it), medians over rounds, and server memory (RSS) per subscription
(protocol 2: after minus before the subscribe frames; protocol 1: per connection, which is its one
subscription). Loopback only; every wait is bounded.

    python -m bench.multichannel             # 3 rounds of 20,000 events, about a minute
    python -m bench.multichannel --quick     # 200 connections, 1 round of 2,000 events

The server side is ``python -m bench.multichannel serve PORT`` (started by the runner).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

PAYLOAD_PAD = "x" * 150


# -- server -----------------------------------------------------------------------------------------


def serve(port: int) -> None:
    """Run the rtbroadcast server: /ws (protocol 1 ``?channel=``, or protocol 2) and POST /burst."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from rtbroadcast import Broadcaster
    from rtbroadcast.starlette import lifespan, websocket_route

    from .servers.rtbroadcast_app import UVICORN_OVERRIDES

    broadcaster = Broadcaster("memory://", position_check_interval=None)

    async def burst(request: Request) -> Response:
        spec = json.loads(await request.body())
        rng = random.Random(spec["seed"])
        channels, batch = spec["channels"], spec["batch"]
        started = time.perf_counter()
        for i in range(spec["events"]):
            channel = f"c{rng.randrange(channels)}"
            await broadcaster.publish_json(channel, f'{{"type":"bench","i":{i},"pad":"{PAYLOAD_PAD}"}}')
            if i % batch == batch - 1:
                await asyncio.sleep(0)
        return Response(json.dumps({"seconds": time.perf_counter() - started}), media_type="application/json")

    app = Starlette(
        routes=[
            websocket_route(
                "/ws",
                broadcaster,
                channel=lambda request: request.query.get("channel"),
                max_messages_per_second=1000.0,
            ),
            Route("/burst", burst, methods=["POST"]),
        ],
        lifespan=lifespan(broadcaster),
    )
    options = {"loop": "uvloop", "http": "httptools", "log_level": "warning", "backlog": 4096}
    uvicorn.run(app, host="127.0.0.1", port=port, **{**options, **UVICORN_OVERRIDES})  # type: ignore[arg-type]


# -- load generator ---------------------------------------------------------------------------------


class Counter:
    """Deliveries and integrity over every subscriber of one target."""

    def __init__(self) -> None:
        self.deliveries = 0
        self.errors = 0
        self.subscribed = 0
        self.welcomed = 0


def _subscriber_class() -> Any:
    from orjson import loads
    from picows import WSFrame, WSListener, WSMsgType, WSTransport

    text = WSMsgType.TEXT

    class Subscriber(WSListener):  # type: ignore[misc]
        """Parses every frame; checks each channel's seq; protocol 2 subscribes once welcomed."""

        def __init__(self, counter: Counter, channels: list[str], protocol: int) -> None:
            super().__init__()
            self.counter = counter
            self.protocol = protocol
            self.channels = channels
            self.last: dict[str, int] = {}

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type is not text:
                return
            m = loads(frame.get_payload_as_bytes())
            kind = m["type"]
            if kind == "event":
                self._event(m["channel"], m["event"]["seq"])
            elif kind == "bench":
                self._event(self.channels[0], m["seq"])
            elif kind == "subscribed":
                self.last[m["channel"]] = m["seq"]
                self.counter.subscribed += 1
            elif kind == "welcome":
                self.transport = transport
                if self.protocol == 1:
                    self.last[m["channel"]] = m["seq"]
                    self.counter.subscribed += 1
                self.counter.welcomed += 1
            else:
                self.counter.errors += 1

        def subscribe(self) -> None:
            for n, channel in enumerate(self.channels):
                request = {"type": "subscribe", "id": f"r{n}", "channel": channel}
                self.transport.send(text, json.dumps(request).encode())

        def _event(self, channel: str, seq: int) -> None:
            counter = self.counter
            if seq != self.last.get(channel, -2) + 1:
                counter.errors += 1
            self.last[channel] = seq
            counter.deliveries += 1

    return Subscriber


class Target:
    """One server process and its subscribers."""

    def __init__(self, name: str, protocol: int, port: int, cpu: int) -> None:
        self.name = name
        self.protocol = protocol
        self.port = port
        command = ["taskset", "-c", str(cpu), sys.executable, "-m", "bench.multichannel", "serve", str(port)]
        self.process = subprocess.Popen(command)
        self.counter = Counter()
        self.rss: dict[str, int] = {}
        self.rounds: list[dict[str, float]] = []

    def memory(self) -> int:
        import psutil  # type: ignore[import-untyped]

        rss: int = psutil.Process(self.process.pid).memory_info().rss
        return rss

    def cpu(self) -> float:
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    async def wait_listening(self, seconds: float = 20.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            return
        raise RuntimeError(f"{self.name}: server did not listen within {seconds} s")

    async def connect(self, plan: list[list[str]], concurrency: int = 100) -> None:
        from picows import ws_connect

        subscriber = _subscriber_class()
        semaphore = asyncio.Semaphore(concurrency)
        url = f"ws://127.0.0.1:{self.port}/ws"

        async def one(channels: list[str]) -> Any:
            query = f"?channel={channels[0]}" if self.protocol == 1 else "?protocol=2"
            async with semaphore:
                transport, listener = await asyncio.wait_for(
                    ws_connect(lambda: subscriber(self.counter, channels, self.protocol), url + query), 30
                )
                return transport, listener

        pairs = await asyncio.gather(*(one(channels) for channels in plan))
        self.transports = [transport for transport, _ in pairs]
        self.listeners = [listener for _, listener in pairs]
        if not await until(lambda: self.counter.welcomed >= len(plan), 60):
            raise RuntimeError(f"{self.name}: {self.counter.welcomed} of {len(plan)} connections welcomed")

    async def burst(self, spec: dict[str, Any]) -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        body = json.dumps(spec).encode()
        head = f"POST /burst HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        writer.write(head.encode() + body)
        response = await asyncio.wait_for(reader.read(), 120)
        writer.close()
        return float(json.loads(response.split(b"\r\n\r\n", 1)[1])["seconds"])

    def stop(self) -> None:
        for transport in getattr(self, "transports", ()):
            transport.disconnect()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    channels = [f"c{n}" for n in range(args.channels)]
    p2_plan = [rng.sample(channels, args.per_connection) for _ in range(args.connections)]
    p1_plan = [[channel] for subscription in p2_plan for channel in subscription]
    subscribers = {channel: 0 for channel in channels}
    for (channel,) in p1_plan:
        subscribers[channel] += 1
    base = 20_000
    targets = [
        Target("protocol 2", 2, base + os.getpid() % 10_000, args.server_cpu),
        Target("protocol 1", 1, base + os.getpid() % 10_000 + 1, args.server_cpu),
    ]
    try:
        for target in targets:
            await target.wait_listening()
            await asyncio.sleep(0.5)
            target.rss["idle"] = target.memory()
        p2, p1 = targets
        # Protocol 2: connect first, then subscribe: the difference is the subscriptions' own memory.
        await p2.connect(p2_plan)
        await asyncio.sleep(0.5)
        p2.rss["connected"] = p2.memory()
        for listener in p2.listeners:
            listener.subscribe()
        await p1.connect(p1_plan)
        expected_subscriptions = len(p1_plan)
        for target in targets:
            if not await until(lambda t=target: t.counter.subscribed >= expected_subscriptions, 60):
                raise RuntimeError(f"{target.name}: {target.counter.subscribed} subscriptions live")
            await asyncio.sleep(0.5)
            target.rss["subscribed"] = target.memory()
        for round_ in range(args.rounds):
            seed = args.seed + 1 + round_
            draw = random.Random(seed)
            expected = sum(subscribers[f"c{draw.randrange(args.channels)}"] for _ in range(args.events))
            spec = {"events": args.events, "channels": args.channels, "seed": seed, "batch": args.batch}
            order = targets if round_ % 2 == 0 else targets[::-1]
            for target in order:
                counter = target.counter
                goal = counter.deliveries + expected
                cpu0, t0, own0 = target.cpu(), time.perf_counter(), time.process_time()
                publish_seconds = await target.burst(spec)
                if not await until(lambda c=counter, g=goal: c.deliveries >= g, 120):
                    raise RuntimeError(f"{target.name}: {goal - counter.deliveries} deliveries missing")
                wall = time.perf_counter() - t0
                cpu = target.cpu() - cpu0
                own = time.process_time() - own0
                target.rounds.append(
                    {
                        "deliveries": expected,
                        "wall_seconds": wall,
                        "server_cpu_seconds": cpu,
                        "publish_seconds": publish_seconds,
                        "deliveries_per_s": expected / wall,
                        "deliveries_per_cpu_s": expected / cpu,
                        "loadgen_busy": own / wall,
                        "server_busy": cpu / wall,
                    }
                )
        await asyncio.sleep(0.2)
    finally:
        for target in targets:
            target.stop()
    result: dict[str, Any] = {"config": vars(args), "subscriptions": len(p1_plan)}
    for target in targets:
        rounds = target.rounds
        result[target.name] = {
            "connections": len(target.transports),
            "rss": target.rss,
            "integrity_errors": target.counter.errors,
            "rounds": rounds,
            "deliveries_per_s": statistics.median(r["deliveries_per_s"] for r in rounds),
            "deliveries_per_cpu_s": statistics.median(r["deliveries_per_cpu_s"] for r in rounds),
            "loadgen_busy": statistics.median(r["loadgen_busy"] for r in rounds),
            "server_busy": statistics.median(r["server_busy"] for r in rounds),
        }
    p2r, p1r = result["protocol 2"], result["protocol 1"]
    subs = len(p1_plan)
    p2r["bytes_per_subscription"] = (p2.rss["subscribed"] - p2.rss["connected"]) / subs
    p2r["bytes_per_connection"] = (p2.rss["connected"] - p2.rss["idle"]) / len(p2_plan)
    p1r["bytes_per_subscription"] = (p1.rss["subscribed"] - p1.rss["idle"]) / subs
    result["ratio_wall"] = p2r["deliveries_per_s"] / p1r["deliveries_per_s"]
    result["ratio_cpu"] = p2r["deliveries_per_cpu_s"] / p1r["deliveries_per_cpu_s"]
    return result


def report(result: dict[str, Any]) -> str:
    p2, p1 = result["protocol 2"], result["protocol 1"]
    config = result["config"]
    lines = [
        f"{result['subscriptions']:,} subscriptions: protocol 2 = {config['connections']:,} connections x "
        f"{config['per_connection']} channels; protocol 1 = {p1['connections']:,} connections; "
        f"{config['channels']:,} channels, {config['events']:,} events per round x {config['rounds']} rounds",
        "",
        "| | deliveries/s (wall) | deliveries per server CPU-second | server RSS per subscription | "
        "server / loadgen core busy | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in (("protocol 2", p2), ("protocol 1", p1)):
        lines.append(
            f"| {name} | {row['deliveries_per_s']:,.0f} | {row['deliveries_per_cpu_s']:,.0f} | "
            f"{row['bytes_per_subscription'] / 1024:.2f} KiB | {row['server_busy']:.0%} / "
            f"{row['loadgen_busy']:.0%} | {row['integrity_errors']} |"
        )
    lines += [
        "",
        f"protocol 2 / protocol 1: {result['ratio_wall']:.2f}x wall, {result['ratio_cpu']:.2f}x per server "
        f"CPU; protocol-2 connection without subscriptions: {p2['bytes_per_connection'] / 1024:.1f} KiB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        serve(int(argv[1]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.multichannel", description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--per-connection", type=int, default=10)
    parser.add_argument("--channels", type=int, default=1000)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=20, help="events published per loop turn")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--loadgen-cpu", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="200 connections, 1 round of 2,000 events")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON too")
    args = parser.parse_args(argv)
    if args.quick:
        args.connections, args.events, args.rounds = 200, 2000, 1
    os.sched_setaffinity(0, {args.loadgen_cpu})
    import uvloop

    result = uvloop.run(measure(args))
    print(report(result))
    if args.json:
        print(json.dumps(result, indent=2))
    failed = result["protocol 2"]["integrity_errors"] or result["protocol 1"]["integrity_errors"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
