"""In-process round trip through a backend: publish, the backend's live delivery, fan-out to N connections.

What ``bench.micro_fanout`` measures for the memory backend, through any backend URL (Redis by default): a
broadcaster with ``channels`` x ``subscribers`` queue-less connections (each takes its frames at once, like
a WebSocket client that keeps reading), then ``publishes`` events round-robin over the channels, awaited
one at a time (``--concurrency 1``) or by several publishers at once, and a wait until every connection had
every event. No HTTP and no sockets to clients, so what is left is what the backend adds: the publish
request and its reply, the PUB/SUB message and its parsing, and the hop into the broadcaster.

Prints the CPU time of this process per event (user and system) and, under valgrind, what to subtract::

    python -m bench.redis_path --publishes 5000 --subscribers 10
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.redis_path --publishes 0
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.redis_path --publishes 2000

The difference between the two totals ("Collected"), divided by the publishes, is the instructions one
event costs this process end to end. Every wait is bounded in time; keys live under a
``rtbench-path-<random>`` prefix and are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from collections.abc import Sequence

from rtbroadcast import Broadcaster, Connection

from .publish_rate import PAYLOAD, _delete, _with_prefix


class _Sink:
    """Counts what the connections were given."""

    def __init__(self) -> None:
        self.delivered = 0

    def take(self, item: object) -> bool:
        self.delivered += 1
        return True


async def run(args: argparse.Namespace) -> dict[str, float]:
    """Attach the connections, publish, wait for every delivery; return the CPU and wall time per event."""
    prefix = f"rtbench-path-{secrets.token_hex(4)}"
    url = _with_prefix(args.url, prefix)
    sink = _Sink()
    names = [f"c{i}" for i in range(args.channels)]
    try:
        async with Broadcaster(url, position_check_interval=None) as broadcaster:
            limits = broadcaster.queue_limits
            for name in names:
                for _ in range(args.subscribers):
                    connection = Connection(name, limits=limits)
                    await broadcaster.attach(connection)
                    connection.get_nowait()  # the welcome
                    connection.set_send_now(sink.take)
            for name in names:  # warm up: script cache, connections
                await broadcaster.publish_json(name, PAYLOAD)
            await _wait_for(sink, len(names) * args.subscribers, args.timeout)
            before, start = os.times(), time.perf_counter()
            per_publisher = args.publishes // args.concurrency

            async def publisher(index: int) -> None:
                for n in range(per_publisher):
                    await broadcaster.publish_json(names[(index + n) % len(names)], PAYLOAD)

            await asyncio.gather(*(publisher(i) for i in range(args.concurrency)))
            done = per_publisher * args.concurrency
            expected = len(names) * args.subscribers + done * args.subscribers
            await _wait_for(sink, expected, args.timeout)
            elapsed, after = time.perf_counter() - start, os.times()
    finally:
        if not args.url.startswith("memory"):
            await _delete(args.url, prefix)
    events = max(1, done)
    return {
        "events": done,
        "wall_us": elapsed / events * 1e6,
        "user_us": (after.user - before.user) / events * 1e6,
        "system_us": (after.system - before.system) / events * 1e6,
    }


async def _wait_for(sink: _Sink, expected: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while sink.delivered < expected:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {sink.delivered} of {expected} deliveries within {seconds} s")
        await asyncio.sleep(0.001)
    if sink.delivered != expected:
        raise SystemExit(f"{sink.delivered} deliveries, expected {expected}")


async def _main(argv: Sequence[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_path", description=__doc__.split("\n")[0])
    parser.add_argument("url", nargs="?", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--publishes", type=int, default=5000)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--subscribers", type=int, default=10, help="connections per channel")
    parser.add_argument("--concurrency", type=int, default=1, help="publishers awaiting at once")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the deliveries")
    args = parser.parse_args(argv)
    figures = await run(args)
    print(
        f"{args.url.split('?')[0]}: {figures['events']:.0f} events x {args.subscribers} subscribers on "
        f"{args.channels} channel(s), concurrency {args.concurrency}: {figures['wall_us']:.1f} us wall, "
        f"{figures['user_us']:.1f} us user + {figures['system_us']:.1f} us system CPU per event"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run once and print one line."""
    try:
        import uvloop

        uvloop.run(_main(argv))
    except ImportError:
        asyncio.run(_main(argv))


if __name__ == "__main__":
    main()
