"""In-process publish rate: ``publish_json()`` with no subscribers and no HTTP, memory against Redis.

Measures, for each backend URL given (memory first, in the same run, so that the ratio means something on a
noisy machine):

- publishes per second one at a time (each awaited before the next);
- publishes per second with ``--concurrency`` publishers (64 by default), each awaiting its own;
- p50/p99 of a single publish at a low, fixed rate (``--low-rate`` per second), where nothing batches;
- the CPU time of this process per publish, which moves far less than wall-clock rates on a shared host.

Every loop is bounded in time. Keys live under a ``rtbench-publish-<random>`` prefix and are deleted at the
end::

    python -m bench.publish_rate                      # memory:// and redis://127.0.0.1:6379/0
    python -m bench.publish_rate --rounds 3 redis+cluster://127.0.0.1:7000
    taskset -c 1 python -m bench.publish_rate         # pinned, Redis on the other core
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from collections.abc import Sequence

from rtbroadcast import Broadcaster

PAYLOAD = '{"type":"bench","id":1,"pad":"' + "x" * 150 + '"}'


def _with_prefix(url: str, prefix: str) -> str:
    if url.startswith("memory"):
        return url
    return url + ("&" if "?" in url else "?") + f"key_prefix={prefix}"


async def _sequential(broadcaster: Broadcaster, seconds: float, channels: int) -> tuple[float, float]:
    done = 0
    cpu = time.process_time()
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline and done < 10_000_000:
        for _ in range(100):
            await broadcaster.publish_json(f"c{done % channels}", PAYLOAD)
            done += 1
    return done / (time.perf_counter() - start), (time.process_time() - cpu) / done * 1e6


async def _concurrent(
    broadcaster: Broadcaster, seconds: float, concurrency: int, channels: int
) -> tuple[float, float]:
    done = 0
    deadline = time.perf_counter() + seconds

    async def publisher(index: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < deadline and n < 10_000_000:
            await broadcaster.publish_json(f"c{(index + n) % channels}", PAYLOAD)
            n += 1
            done += 1

    cpu = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(publisher(i) for i in range(concurrency)))
    return done / (time.perf_counter() - start), (time.process_time() - cpu) / done * 1e6


async def _latency(broadcaster: Broadcaster, seconds: float, rate: float) -> tuple[float, float]:
    samples: list[float] = []
    interval = 1 / rate
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and len(samples) < 1_000_000:
        start = time.perf_counter()
        await broadcaster.publish_json("latency", PAYLOAD)
        samples.append(time.perf_counter() - start)
        await asyncio.sleep(max(0.0, interval - (time.perf_counter() - start)))
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6


async def measure(url: str, args: argparse.Namespace) -> dict[str, float]:
    """Return the figures of one backend URL (medians over rounds)."""
    prefix = f"rtbench-publish-{secrets.token_hex(4)}"
    one: list[float] = []
    many: list[float] = []
    one_cpu: list[float] = []
    many_cpu: list[float] = []
    p50: list[float] = []
    p99: list[float] = []
    async with Broadcaster(_with_prefix(url, prefix), position_check_interval=None) as broadcaster:
        for _ in range(50):  # warm up: connections, script cache
            await broadcaster.publish_json("warm", PAYLOAD)
        for _ in range(args.rounds):
            rate, cpu = await _sequential(broadcaster, args.seconds, args.channels)
            one.append(rate)
            one_cpu.append(cpu)
            rate, cpu = await _concurrent(broadcaster, args.seconds, args.concurrency, args.channels)
            many.append(rate)
            many_cpu.append(cpu)
            a, b = await _latency(broadcaster, args.seconds, args.low_rate)
            p50.append(a)
            p99.append(b)
    if not url.startswith("memory"):
        await _delete(url, prefix)
    return {
        "one": statistics.median(one),
        "many": statistics.median(many),
        "one_cpu_us": statistics.median(one_cpu),
        "many_cpu_us": statistics.median(many_cpu),
        "p50_us": statistics.median(p50),
        "p99_us": statistics.median(p99),
    }


async def _delete(url: str, prefix: str) -> None:
    import redis.asyncio

    if "+cluster" in url:
        from redis.asyncio.cluster import RedisCluster

        first = url.split("://", 1)[1].split(",", 1)[0].split("/", 1)[0].split("?", 1)[0]
        cluster = RedisCluster.from_url(f"redis://{first}")
        try:
            async for key in cluster.scan_iter(match=f"{prefix}:*", count=1000):
                await cluster.delete(key)
        finally:
            await cluster.aclose()
        return
    client = redis.asyncio.Redis.from_url(url.split("?", 1)[0])
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    finally:
        await client.aclose()


async def _main(argv: Sequence[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.publish_rate", description=__doc__.split("\n")[0])
    parser.add_argument("urls", nargs="*", default=["memory://", "redis://127.0.0.1:6379/0"])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each trial")
    parser.add_argument("--rounds", type=int, default=3, help="trials per figure (median)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--channels", type=int, default=64, help="channels published to, round-robin")
    parser.add_argument("--low-rate", type=float, default=200.0, help="publishes/s of the latency trial")
    args = parser.parse_args(argv)
    results = {url: await measure(url, args) for url in args.urls}
    base = results.get("memory://")
    print(
        f"| backend | one at a time /s | CPU us each | {args.concurrency} concurrent /s | CPU us each "
        "| vs memory | p50 us | p99 us |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for url, figures in results.items():
        ratio = f"{figures['many'] / base['many']:.0%}" if base else "-"
        print(
            f"| {url.split('?')[0]} | {figures['one']:,.0f} | {figures['one_cpu_us']:.1f} "
            f"| {figures['many']:,.0f} | {figures['many_cpu_us']:.1f} | {ratio} "
            f"| {figures['p50_us']:.0f} | {figures['p99_us']:.0f} |"
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the measurement and print a Markdown table."""
    try:
        import uvloop

        uvloop.run(_main(argv))
    except ImportError:
        asyncio.run(_main(argv))


if __name__ == "__main__":
    main()
