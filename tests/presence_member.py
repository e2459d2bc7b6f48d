"""A process that joins presence members on Redis, says so, and waits to be killed.

``python -m tests.presence_member REDIS_URL PREFIX CHANNEL COUNT HEARTBEAT``: prints ``ready`` once its
``COUNT`` members of ``CHANNEL`` joined, then sleeps until killed (the test kills it with ``SIGKILL``).
"""

from __future__ import annotations

import asyncio
import sys

from rtbroadcast.backends.base import BackendListener
from rtbroadcast.backends.redis import RedisBackend
from rtbroadcast.presence import PresenceMember


class Deaf(BackendListener):
    """Hears nothing: this process only holds members."""


async def main(url: str, prefix: str, channel: str, count: int, heartbeat: float) -> None:
    backend = RedisBackend(url, key_prefix=prefix, presence_heartbeat=heartbeat)
    await backend.connect(Deaf())
    for n in range(count):
        await backend.presence_join(channel, PresenceMember(f"doomed-{n}", "doomed", {"n": n}), limit=0)
    print("ready", flush=True)  # noqa: T201  (the test waits for this line)
    await asyncio.Event().wait()


if __name__ == "__main__":
    url, prefix, channel, count, heartbeat = sys.argv[1:]
    asyncio.run(main(url, prefix, channel, int(count), float(heartbeat)))
