"""In-process fan-out micro-benchmark: publishes to one channel with N queue-only connections.

No transport, no sockets: each connection is a bare :class:`rtbroadcast.Connection` attached to a memory
broadcaster, so what is measured is the core's path from ``publish_json()`` to N outbound queues (the
cursor checks and the queue appends). Meant for instruction counts, which do not depend on the machine's
load::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.micro_fanout 1000 0
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.micro_fanout 1000 200

The difference between the two totals ("Collected"), divided by 200, is the cost of one publish fanned
out to 1,000 connections. Without valgrind it prints the wall-clock time per publish.
"""

from __future__ import annotations

import asyncio
import sys
import time

from rtbroadcast import Broadcaster, Connection

PAYLOAD = '{"type":"bench","id":1,"pad":"' + "x" * 150 + '"}'


async def run(connections: int, publishes: int) -> float:
    """Attach ``connections`` queue-only connections, publish ``publishes`` events; return seconds taken."""
    async with Broadcaster("memory://", position_check_interval=None) as broadcaster:
        attached = [Connection("c", limits=broadcaster.queue_limits) for _ in range(connections)]
        for connection in attached:
            await broadcaster.attach(connection)
        start = time.perf_counter()
        for _ in range(publishes):
            await broadcaster.publish_json("c", PAYLOAD)
        elapsed = time.perf_counter() - start
        assert all(c.queued == publishes + 1 for c in attached)  # the welcome, then every event
        return elapsed


def main() -> None:
    connections = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    publishes = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    elapsed = asyncio.run(run(connections, publishes))
    if publishes:
        per = elapsed / publishes * 1e6
        print(f"{publishes} publishes x {connections} connections: {per:.1f} us per publish")


if __name__ == "__main__":
    main()
