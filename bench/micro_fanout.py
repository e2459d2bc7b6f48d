"""In-process fan-out micro-benchmark: publishes to one channel with N queue-only connections.

No transport, no sockets: each connection is a bare :class:`rtbroadcast.Connection` attached to a memory
broadcaster, so what is measured is the core's path from ``publish_json()`` to N outbound queues (the
cursor checks and the queue appends). Meant for instruction counts, which do not depend on the machine's
load::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.micro_fanout 1000 0
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.micro_fanout 1000 200

The difference between the two totals ("Collected"), divided by 200, is the cost of one publish fanned
out to 1,000 connections. Without valgrind it prints the wall-clock time per publish. A third argument
``direct`` gives every connection a transport that takes each frame at once (``set_send_now``), the path
of a WebSocket client that keeps reading, instead of leaving frames in the queue. A word ``p2`` makes
every connection a protocol-2 connection subscribed to the channel (its transport takes the wrapped
protocol-2 text, built once per envelope and shared). The word ``metrics`` enables
:class:`rtbroadcast.metrics.PrometheusMetrics`, to measure what it adds. Flags come after the two counts,
in any order (``1000 200 direct p2 metrics``).
"""

from __future__ import annotations

import asyncio
import sys
import time

from rtbroadcast import Broadcaster, Connection
from rtbroadcast.connection import item_text_v2

PAYLOAD = '{"type":"bench","id":1,"pad":"' + "x" * 150 + '"}'


def _take(item: object) -> bool:
    return True


def _take_v2(item: object) -> bool:
    item_text_v2(item)  # type: ignore[arg-type]
    return True


async def run(
    connections: int, publishes: int, *, direct: bool = False, p2: bool = False, metrics: bool = False
) -> float:
    """Attach ``connections`` queue-only connections, publish ``publishes`` events; return seconds taken."""
    async with Broadcaster("memory://", position_check_interval=None) as broadcaster:
        if metrics:
            from prometheus_client import CollectorRegistry

            from rtbroadcast.metrics import PrometheusMetrics

            PrometheusMetrics(broadcaster, registry=CollectorRegistry())
        limits = broadcaster.queue_limits
        if p2:
            attached = [Connection(protocol=2, limits=limits) for _ in range(connections)]
        else:
            attached = [Connection("c", limits=limits) for _ in range(connections)]
        for connection in attached:
            await broadcaster.attach(connection)
            if p2:
                await broadcaster.add_subscription(connection, "c")
                connection.get_nowait()  # the welcome; the subscribed frame stays queued
            if direct:
                connection.get_nowait()  # the welcome (protocol 2: the subscribed frame)
                connection.set_send_now(_take_v2 if p2 else _take)
        start = time.perf_counter()
        for _ in range(publishes):
            await broadcaster.publish_json("c", PAYLOAD)
        elapsed = time.perf_counter() - start
        expected = 0 if direct else publishes + 1  # the welcome, then every event
        assert all(c.queued == expected for c in attached)
        return elapsed


def main() -> None:
    connections = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    publishes = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    flags = set(sys.argv[3:])
    elapsed = asyncio.run(
        run(connections, publishes, direct="direct" in flags, p2="p2" in flags, metrics="metrics" in flags)
    )
    if publishes:
        per = elapsed / publishes * 1e6
        print(f"{publishes} publishes x {connections} connections: {per:.1f} us per publish")


if __name__ == "__main__":
    main()
