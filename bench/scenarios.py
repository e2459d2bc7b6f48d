"""Scenarios and stacks of the benchmark, for the full run and for ``--quick``."""

from __future__ import annotations

from dataclasses import dataclass

#: Stacks in the order they run and are shown; the first is the reference the ratios divide by.
STACKS: dict[str, str] = {
    "raw-websockets": "websockets server + websockets.broadcast() (reference 1, the limit)",
    "naive-starlette": "Starlette, `for ws in clients: await ws.send_text(text)` (reference 2)",
    "broadcaster-memory": "encode/broadcaster memory backend + Starlette (reference 3)",
    "broadcaster-redis": "encode/broadcaster Redis backend + Starlette (reference 3)",
    "rtbroadcast-memory": "rtbroadcast memory backend + Starlette (target)",
    "rtbroadcast-redis": "rtbroadcast Redis backend + Starlette (target)",
    "rtbroadcast-cluster": "rtbroadcast Redis Cluster backend + Starlette (target; needs --cluster-url)",
    "rtbroadcast-deflate": "rtbroadcast memory backend, permessage-deflate accepted (the opt-in)",
}
REFERENCE = "raw-websockets"
REDIS_STACKS = frozenset(s for s in STACKS if s.endswith("-redis"))
CLUSTER_STACKS = frozenset({"rtbroadcast-cluster"})
QUICK_STACKS = ("raw-websockets", "rtbroadcast-memory", "rtbroadcast-redis")


@dataclass(frozen=True)
class Scenario:
    """One load shape. Every stack runs it against a fresh server process."""

    name: str
    title: str
    channels: int
    subs_per_channel: int
    #: Subscribers per channel that read slowly (on top of ``subs_per_channel``).
    slow_per_channel: int = 0
    #: Events per second of the fixed-rate latency phase (0: no latency phase).
    rate: float = 0.0
    #: Hold the connections idle this long, then measure memory and publish one event per channel.
    idle_seconds: float = 0.0
    #: Concurrent HTTP publisher connections (each waits for its answer before its next POST).
    publishers: int = 8
    #: Most events published but not yet received by every (normal) subscriber, in saturation.
    window: int = 64
    #: Subscribers offer permessage-deflate, as browsers do (and decompress what comes compressed).
    deflate: bool = False

    @property
    def subscribers(self) -> int:
        return self.channels * (self.subs_per_channel + self.slow_per_channel)

    @property
    def idle(self) -> bool:
        return self.idle_seconds > 0


def _window(subs_per_channel: int, channels: int) -> int:
    """Enough incomplete events to keep a server busy, without deep queues: ~8k deliveries."""
    return max(8, min(64 * channels, -(-8192 // subs_per_channel)))


#: In both plans: one slow reader among 100 (the other 99 are measured).
SLOW_1_OF_100 = Scenario(
    "slow-1-of-100",
    "1 channel x 100 subscribers, 1 of them a slow reader",
    1,
    99,
    slow_per_channel=1,
    rate=100,
    window=_window(99, 1),
)

FULL: tuple[Scenario, ...] = (
    Scenario("fanout-10", "1 channel x 10 subscribers", 1, 10, rate=500, window=_window(10, 1)),
    Scenario("fanout-100", "1 channel x 100 subscribers", 1, 100, rate=100, window=_window(100, 1)),
    Scenario("fanout-1000", "1 channel x 1000 subscribers", 1, 1000, rate=20, window=_window(1000, 1)),
    Scenario(
        "channels-1000x5",
        "1000 channels x 5 subscribers",
        1000,
        5,
        rate=500,
        window=_window(5, 1000),
    ),
    SLOW_1_OF_100,
    # The same fan-out with subscribers that offer compression, as every browser does.
    Scenario(
        "fanout-100-deflate",
        "1 channel x 100 subscribers offering permessage-deflate",
        1,
        100,
        rate=100,
        window=_window(100, 1),
        deflate=True,
    ),
    Scenario(
        "fanout-1000-deflate",
        "1 channel x 1000 subscribers offering permessage-deflate",
        1,
        1000,
        rate=20,
        window=_window(1000, 1),
        deflate=True,
    ),
    Scenario("idle-10k", "10,000 idle connections (100 channels x 100)", 100, 100, idle_seconds=3),
)

QUICK: tuple[Scenario, ...] = (
    Scenario("fanout-10", "1 channel x 10 subscribers", 1, 10, rate=500, window=_window(10, 1)),
    Scenario("fanout-100", "1 channel x 100 subscribers", 1, 100, rate=100, window=_window(100, 1)),
    Scenario(
        "channels-100x5",
        "100 channels x 5 subscribers",
        100,
        5,
        rate=500,
        window=_window(5, 100),
    ),
    SLOW_1_OF_100,
    Scenario("idle-1k", "1,000 idle connections (10 channels x 100)", 10, 100, idle_seconds=1),
)

#: Interleaved rounds, and seconds of one latency trial and one saturation trial per stack and
#: round.
FULL_TIMING: dict[str, float] = {"rounds": 4, "rate": 1.5, "saturation": 1.0}
QUICK_TIMING: dict[str, float] = {"rounds": 1, "rate": 1.0, "saturation": 1.0}

#: Which scenario of the same stack the slow-reader scenario is compared with.
SLOW_BASELINE = {"slow-1-of-100": "fanout-100"}
#: Which scenario without compression each compression-offering scenario is compared with.
DEFLATE_BASELINE = {"fanout-100-deflate": "fanout-100", "fanout-1000-deflate": "fanout-1000"}
