"""The protocol-2 client's presence against the real presence server (branch ``presence``).

Skipped where the server has no presence yet (``Broadcaster(presence=...)``): the test runs once it is
merged. The client's handling of the frames themselves is tested against scripted frames in
tests/test_client_protocol2.py.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from rtbroadcast import Allow, Broadcaster
from rtbroadcast.asgi import ConnectionRequest
from rtbroadcast.client import Backoff, Client, PresenceChange

from .support import broadcast_app, serve, until

HAS_PRESENCE = "presence" in inspect.signature(Broadcaster).parameters
pytestmark = pytest.mark.skipif(not HAS_PRESENCE, reason="the server side of presence is not merged yet")
FAST = Backoff(initial_delay=0.05, max_delay=0.2)


def nothing(request: ConnectionRequest) -> None:
    return None


def named(request: ConnectionRequest, channel: str) -> Allow:
    return Allow(info={"name": request.query.get("name", "?")})


async def test_two_clients_see_each_other_join_and_leave() -> None:
    broadcaster = Broadcaster("memory://", presence=("restaurant:",))  # type: ignore[call-arg,unused-ignore]
    changes: list[tuple[str, int, list[Any]]] = []

    def seen(change: PresenceChange) -> None:
        names = [member.info.get("name") for member in change.presence.members.values()]
        changes.append((change.kind, change.presence.count, names))

    async with (
        serve(broadcast_app(broadcaster, channel=nothing, authorize=named)) as host,
        Client(f"ws://{host}/ws?name=host", protocol=2, backoff=FAST) as first,
    ):
        stand = first.subscribe("restaurant:R", presence=True, on_presence=seen)
        subscribed = await stand.connected()
        assert subscribed.resumed is False
        assert stand.presence is not None and stand.presence.count == 1
        [me] = stand.presence.members.values()
        assert me.client == first.connection_id and me.info == {"name": "host"}
        async with Client(f"ws://{host}/ws?name=bar", protocol=2, backoff=FAST) as second:
            bar = second.subscribe("restaurant:R", presence=True)
            await bar.connected()
            assert bar.presence is not None and bar.presence.count == 2
            # Presence is applied as it arrives, whether the subscription is being read or not.
            await until(lambda: stand.presence is not None and stand.presence.count == 2)
        await until(lambda: stand.presence is not None and stand.presence.count == 1)
    assert changes == [
        ("snapshot", 1, ["host"]),
        ("join", 2, ["host", "bar"]),
        ("leave", 1, ["host"]),
    ]
