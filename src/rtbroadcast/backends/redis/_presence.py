"""Presence on Redis: every process's members in per-channel keys, kept alive by a heartbeat.

A channel's presence lives in four keys of its own hash tag (members, join order, processes' deadlines,
version), named in ``_keys`` with every other key; the Lua scripts are in ``_scripts``.

Joins and leaves are PUBLISHed on the channel's own PUB/SUB channel, as ``p <version> j|l <member JSON>``
(an event's message starts with its seq, a digit), so that exactly the processes subscribed to the
channel hear them, in the order Redis applied them, interleaved with the channel's events.

A process refreshes its deadline on every channel it has members on every ``heartbeat / 2`` seconds,
to ``now + 1.5 * heartbeat``. Every script first removes the members of processes past their deadline
(and publishes their leaves), and every live process runs one on each of its channels at each refresh:
the members of a process killed with ``kill -9`` leave within ``2 * heartbeat``. A process that finds
itself removed (its event loop stalled past its deadline, or Redis lost its data) joins its members again.
Every key expires ``3 * heartbeat`` after the last refresh, so nothing outlives the last process.

Versions start at the server's clock in microseconds when a channel's counter is created, so that a
channel whose keys were lost never goes back to a version a watcher already saw.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from ...errors import BackendError, StateError
from ...presence import PresenceChange, PresenceMember, PresenceSnapshot
from ..base import Backend, BackendListener
from ._keys import KeyLayout
from ._scripts import PRESENCE_JOIN, PRESENCE_LEAVE, PRESENCE_REFRESH, PRESENCE_SNAPSHOT

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["PRESENCE_MESSAGE_PREFIX", "RedisPresence", "RedisPresenceMixin", "is_presence_message"]

logger = logging.getLogger("rtbroadcast.redis")

#: How a presence message on a channel's PUB/SUB channel starts (an event's starts with a digit).
PRESENCE_MESSAGE_PREFIX: Final = "p "


class _Host(Protocol):
    """What :class:`RedisPresence` needs of the :class:`~rtbroadcast.backends.redis.RedisBackend`."""

    _timeout: float
    _keys: KeyLayout
    _listener: BackendListener | None

    def _require(self, action: str) -> Redis: ...

    def _translate(self, exc: BaseException, action: str) -> BackendError: ...


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisPresence:
    """The presence half of the Redis backend: this process's members, the heartbeat, the scripts.

    Args:
        host: the backend whose client, key names and timeout it uses.
        heartbeat: seconds; see the module's docstring for what it bounds.
    """

    def __init__(self, host: _Host, heartbeat: float) -> None:
        self._host = host
        self.heartbeat = heartbeat
        self._process = secrets.token_hex(8)
        self._deadline_ms = math.ceil(heartbeat * 1500)
        self._key_ttl_ms = math.ceil(heartbeat * 3000)
        self._scripts: dict[str, AsyncScript] = {}
        # This process's members, per channel, with whether their changes are published.
        self._local: dict[str, dict[str, tuple[PresenceMember, bool]]] = {}
        # Joins on their way, per channel: a leave meanwhile is not the process's last on the channel.
        self._joining: dict[str, int] = {}
        # Leaves that could not reach Redis: retried at each refresh.
        self._pending_leaves: dict[str, dict[str, bool]] = {}
        self._task: asyncio.Task[None] | None = None
        self._refreshes = 0
        self._rejoins = 0
        self._errors = 0
        self._malformed = 0

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self, client: Redis) -> None:
        """Register the scripts on ``client`` (called once connected).

        The heartbeat starts with this process's first join: a process without presence runs no task.
        """
        self._process = secrets.token_hex(8)
        self._scripts = {
            "join": client.register_script(PRESENCE_JOIN),
            "leave": client.register_script(PRESENCE_LEAVE),
            "snapshot": client.register_script(PRESENCE_SNAPSHOT),
            "refresh": client.register_script(PRESENCE_REFRESH),
        }

    def _ensure_heartbeat(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._heartbeat_forever(), name="rtbroadcast-redis-presence"
            )

    async def stop(self) -> None:
        """Stop the heartbeat and forget this process's members (they expire on Redis). Never raises."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        self._local.clear()
        self._pending_leaves.clear()

    def stats(self) -> dict[str, object]:
        """Return presence figures for the backend's stats."""
        return {
            "presence_channels": len(self._local),
            "presence_members": sum(len(m) for m in self._local.values()),
            "presence_refreshes": self._refreshes,
            "presence_rejoins": self._rejoins,
            "presence_errors": self._errors,
        }

    # -- names and scripts --------------------------------------------------------------------------

    def keys(self, channel: str) -> list[str]:
        """Return the presence keys of ``channel``: members, order, processes, version."""
        return self._host._keys.presence(channel)

    def _pubsub(self, channel: str) -> str:
        return self._host._keys.pubsub(channel)

    async def _run(self, script: str, keys: list[str], args: Sequence[str | int], action: str) -> Any:
        """Run a presence script within the backend's timeout.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: Redis cannot be reached, or answered "not now".
            BackendError: Redis refused the script.
        """
        host = self._host
        client = host._require(action)
        from redis.exceptions import RedisError  # the module is only loaded with the redis extra

        try:
            async with asyncio.timeout(host._timeout):
                return await self._scripts[script](keys=keys, args=list(args), client=client)
        except (RedisError, TimeoutError, OSError) as exc:
            raise host._translate(exc, action) from exc

    def _snapshot(self, reply: Any, *, limit: int) -> PresenceSnapshot:
        count, version, entries = int(reply[0]), int(reply[1]), reply[2]
        members = []
        for entry in entries[: max(0, limit)]:
            _, _, data = _text(entry).partition(" ")
            members.append(PresenceMember.from_json(data))
        return PresenceSnapshot(count, tuple(members), len(members) < count, version)

    # -- the backend's presence methods -------------------------------------------------------------

    async def join(
        self, channel: str, member: PresenceMember, *, limit: int, notify: bool
    ) -> PresenceSnapshot:
        """Add ``member``, publish its join, return the snapshot that includes it (see ``Backend``)."""
        data = member.to_json()
        self._pending_leaves.get(channel, {}).pop(member.client, None)
        self._ensure_heartbeat()
        self._joining[channel] = self._joining.get(channel, 0) + 1
        try:
            reply = await self._run(
                "join",
                self.keys(channel),
                [
                    self._process,
                    member.client,
                    data,
                    self._deadline_ms,
                    self._key_ttl_ms,
                    max(0, limit),
                    self._pubsub(channel),
                    int(notify),
                ],
                "join presence",
            )
        except BackendError:
            # A join that timed out may still have been applied: leave at the next refresh, so that no
            # member of this process outlives the subscription that failed.
            self._pending_leaves.setdefault(channel, {})[member.client] = notify
            raise
        finally:
            if self._joining[channel] == 1:
                del self._joining[channel]
            else:
                self._joining[channel] -= 1
        # Kept only once Redis has it: a join that failed is not refreshed, nor joined again later.
        self._local.setdefault(channel, {})[member.client] = (member, notify)
        return self._snapshot(reply, limit=limit)

    async def leave(self, channel: str, client: str, *, notify: bool) -> None:
        """Remove this process's member ``client``; on failure, retry at the next refresh. Never raises."""
        local = self._local.get(channel)
        if local is not None:
            local.pop(client, None)
            if not local:
                del self._local[channel]
        try:
            await self._leave(channel, client, notify, last=self._is_last(channel))
        except BackendError as exc:
            self._errors += 1
            logger.warning(
                "presence leave of %r on %r failed, retrying at the next refresh: %s", client, channel, exc
            )
            self._pending_leaves.setdefault(channel, {})[client] = notify
        except StateError:  # disconnected meanwhile: the member expires with this process's deadline
            logger.debug("presence leave of %r on %r skipped", client, channel, exc_info=True)

    def _is_last(self, channel: str) -> bool:
        return channel not in self._local and channel not in self._joining

    async def _leave(self, channel: str, client: str, notify: bool, *, last: bool) -> None:
        await self._run(
            "leave",
            self.keys(channel),
            [self._process, client, self._pubsub(channel), int(notify), int(last)],
            "leave presence",
        )

    async def snapshot(self, channel: str, *, limit: int) -> PresenceSnapshot:
        """Return the channel's presence across every process (see ``Backend.presence_snapshot``)."""
        reply = await self._run(
            "snapshot", self.keys(channel), [max(0, limit), self._pubsub(channel)], "read presence"
        )
        return self._snapshot(reply, limit=limit)

    async def count(self, channel: str) -> int:
        """Return the channel's member count across every process."""
        return (await self.snapshot(channel, limit=0)).count

    # -- PUB/SUB ------------------------------------------------------------------------------------

    def deliver(self, channel: str, message: str) -> None:
        """Hand a presence message of ``channel``'s PUB/SUB channel to the listener."""
        listener = self._host._listener
        if listener is None:
            return
        try:
            _, version, kind, data = message.split(" ", 3)
            if kind not in ("j", "l"):
                raise ValueError(kind)
            change = PresenceChange(
                channel,
                "join" if kind == "j" else "leave",
                PresenceMember.from_json(data),
                int(version),
                data,
            )
        except ValueError:
            self._malformed += 1
            logger.error("ignoring a malformed presence message on %r: %.80r", channel, message)
            return
        try:
            listener.on_presence(change)
        except Exception:
            logger.exception("the backend listener failed in on_presence() for %r", channel)

    # -- the heartbeat ------------------------------------------------------------------------------

    async def _heartbeat_forever(self) -> None:
        interval = self.heartbeat / 2
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:
                self._errors += 1
                logger.exception("presence refresh failed; retrying in %.1f s", interval)

    async def refresh(self) -> None:
        """Push this process's deadline back on each of its channels; join again where it was removed.

        Runs by itself every ``heartbeat / 2`` seconds. A channel whose refresh fails is tried again at the
        next one (a member of this process then expires only if every refresh fails for ``1.5 *
        heartbeat``).
        """
        self._refreshes += 1
        for channel, leaves in list(self._pending_leaves.items()):
            for client, notify in list(leaves.items()):
                try:
                    await self._leave(channel, client, notify, last=self._is_last(channel))
                except BackendError as exc:
                    logger.debug("presence leave of %r on %r failed again: %s", client, channel, exc)
                    break
                leaves.pop(client, None)
            if not leaves:
                self._pending_leaves.pop(channel, None)
        channels = list(self._local)
        results = await asyncio.gather(
            *(self._refresh(channel) for channel in channels), return_exceptions=True
        )
        for channel, result in zip(channels, results, strict=True):
            if isinstance(result, BaseException):
                self._errors += 1
                logger.warning("presence refresh of %r failed: %s", channel, result)

    async def _refresh(self, channel: str) -> None:
        alive = await self._run(
            "refresh",
            self.keys(channel),
            [self._process, self._deadline_ms, self._key_ttl_ms, self._pubsub(channel)],
            "refresh presence",
        )
        if int(alive):
            return
        members = list(self._local.get(channel, {}).values())
        if not members:
            return
        self._rejoins += 1
        logger.warning(
            "presence: this process was missing from %r (stalled past its deadline, or Redis lost its "
            "data); joining its %d member(s) again",
            channel,
            len(members),
        )
        for member, notify in members:
            if member.client in self._local.get(channel, {}):
                await self.join(channel, member, limit=0, notify=notify)


class RedisPresenceMixin(Backend):
    """The presence methods of :class:`~rtbroadcast.backends.redis.RedisBackend`, kept in this module."""

    supports_presence = True
    _presence: RedisPresence

    async def presence_join(
        self, channel: str, member: PresenceMember, *, limit: int, notify: bool = True
    ) -> PresenceSnapshot:
        """Add ``member`` on Redis; see :meth:`Backend.presence_join`.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: Redis cannot be reached within the timeout.
            ConfigurationError: ``member.info`` is not JSON-serialisable.
        """
        return await self._presence.join(channel, member, limit=limit, notify=notify)

    async def presence_leave(self, channel: str, client: str, *, notify: bool = True) -> None:
        """Remove the member; a leave that cannot reach Redis is retried at the next heartbeat."""
        await self._presence.leave(channel, client, notify=notify)

    async def presence_snapshot(self, channel: str, *, limit: int) -> PresenceSnapshot:
        """Return the channel's presence across every process (expired processes removed first).

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: Redis cannot be reached within the timeout.
        """
        return await self._presence.snapshot(channel, limit=limit)

    async def presence_count(self, channel: str) -> int:
        """Return the channel's member count across every process.

        Raises:
            StateError: the backend is not connected.
            BackendUnavailable: Redis cannot be reached within the timeout.
        """
        return await self._presence.count(channel)


def is_presence_message(message: str) -> bool:
    """Return whether a message of a channel's PUB/SUB channel is a presence change."""
    return message.startswith(PRESENCE_MESSAGE_PREFIX)
