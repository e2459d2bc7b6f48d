"""Reconnecting to a backend's server: the ``reconnect_delay`` option and the pause between attempts.

Shared by the listeners of the Redis, Redis Cluster, Redis Sentinel and PostgreSQL backends.
"""

from __future__ import annotations

import random

from .._config import is_seconds
from ..errors import ConfigurationError

__all__ = ["check_reconnect_delay", "reconnect_pause"]


def check_reconnect_delay(reconnect_delay: object) -> tuple[float, float]:
    """Return ``(first, most)`` seconds between reconnect attempts.

    Raises:
        ConfigurationError: not a pair of durations with ``0 < first <= most``.
    """
    delays = tuple(reconnect_delay) if isinstance(reconnect_delay, tuple | list) else ()
    if len(delays) != 2 or not all(map(is_seconds, delays)) or delays[0] > delays[1]:
        raise ConfigurationError(
            f"reconnect_delay must be (first, most) seconds with 0 < first <= most, not {reconnect_delay!r}"
        )
    return (float(delays[0]), float(delays[1]))


def reconnect_pause(rng: random.Random, failures: int, delays: tuple[float, float]) -> float:
    """Return the seconds to wait before the next reconnect attempt, after ``failures`` in a row.

    The delay doubles with each failure from ``first`` up to ``most`` (``delays``), and is drawn at random
    from its upper half: jitter spreads the reconnects of many processes after a server restart. ``rng`` is
    the backend's own generator, seeded when it connects, so that a service that seeds the ``random``
    module (or a generator forked with the process) does not make every process wait alike.
    """
    first, most = delays
    delay = min(most, first * 2 ** min(failures, 32))  # the exponent is capped: no overflow
    return rng.uniform(delay / 2, delay)
