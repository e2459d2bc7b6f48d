"""Devices on the realtime endpoint: who they are, presence at their restaurant, their own device channel.

Protocol 1 (the iOS devices, ``/realtime?restaurant_id=R``) is served exactly as before: one restaurant
channel per connection, the token checked by :meth:`AccessPolicy.authorize`. On protocol 2
(``/realtime?protocol=2``), a connection with a valid token

- is the device its token names (:meth:`RealtimeAccess.authenticate`: the :class:`~rtbroadcast.Identity`
  carries the token's ``sub`` and ``name``, never anything the client sends), so that its presence member
  on ``restaurant:<restaurant_id>`` says which device it is;
- is subscribed by the server to its own device channel ``device:<restaurant_id>:<device_id>``
  (:func:`device_channel`), where the service sends it :class:`~.events.DeviceMessage` events, and
- may subscribe to its restaurant's channel (with ``presence: true`` to see who else is online) and to
  nothing else: another restaurant, or another device's channel, is refused for that request only.

The device channel names the restaurant too, so that a message sent through one restaurant's API can only
reach a device whose token is bound to that restaurant.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

from rtbroadcast import Broadcaster, Deny, Identity
from rtbroadcast.asgi import ConnectionRequest, channel_from_query
from rtbroadcast.protocol import is_valid_channel

from .auth import LEEWAY, AccessPolicy, DeviceClaims, TokenError, realtime_token
from .events import DeviceMessage
from .schemas import RESTAURANT_ID_PATTERN
from .service import CHANNEL_PREFIX

__all__ = ["DEVICE_CHANNEL_PREFIX", "RealtimeAccess", "device_channel", "send_device_message"]

logger = logging.getLogger(__name__)

#: A device's own channel is ``device:<restaurant_id>:<device_id>``.
DEVICE_CHANNEL_PREFIX = "device:"

_RESTAURANT_ID = re.compile(RESTAURANT_ID_PATTERN)


def device_channel(restaurant_id: str, device_id: str) -> str:
    """Return the channel of one device of a restaurant."""
    return f"{DEVICE_CHANNEL_PREFIX}{restaurant_id}:{device_id}"


def device_identity(device: DeviceClaims) -> Identity:
    """The identity of a device connection: its id, its restaurant as its tag, its presence info.

    As :meth:`AccessPolicy.identify`, plus the presence info: rtbroadcast closes the connection
    (4003 ``token expired``) when ``expires_at`` (the token's expiry plus the leeway) passes.
    """
    info: dict[str, Any] = {"device": device.device_id, "name": device.name or device.device_id}
    return Identity(
        id=device.device_id,
        tags=frozenset({device.restaurant_id}),
        info=info,
        expires_at=datetime.fromtimestamp(device.expires_at + LEEWAY, UTC),
    )


class RealtimeAccess:
    """The realtime endpoint's hooks (``authenticate``, ``channel``, ``authorize``) over an access policy."""

    def __init__(self, policy: AccessPolicy) -> None:
        self.policy = policy
        self._restaurant = channel_from_query(
            "restaurant_id", prefix=CHANNEL_PREFIX, pattern=RESTAURANT_ID_PATTERN
        )

    def authenticate(self, request: ConnectionRequest) -> Identity | Deny | None:
        """The device the connection's token names; ``None`` (anonymous) without one.

        On protocol 1 an invalid token is left to :meth:`authorize`, which refuses it as it always did
        (after the channel checks, so close codes do not change); on protocol 2 it is refused here.
        """
        try:
            device = self.policy.authenticate(realtime_token(request))
        except TokenError as exc:
            return Deny(exc.reason) if request.protocol == 2 else None
        return device_identity(device) if device is not None else None

    def channel(self, request: ConnectionRequest) -> str | list[str] | None:
        """Protocol 1: the ``restaurant_id`` query parameter's channel. Protocol 2: the device's channel."""
        if request.protocol == 1:
            return self._restaurant(request)
        identity = request.identity
        if identity is None:
            return None
        channel = self._own_channel(identity)
        if channel is None or not is_valid_channel(channel):
            logger.info("device %r has no device channel (its id cannot name one)", identity.id)
            return None
        return [channel]

    def authorize(self, request: ConnectionRequest, channel: str) -> bool | Deny:
        """A restaurant channel: the token's restaurant. A device channel: only the device's own."""
        if channel.startswith(CHANNEL_PREFIX):
            if _RESTAURANT_ID.fullmatch(channel.removeprefix(CHANNEL_PREFIX)) is None:
                return Deny("not a restaurant id")
            return self.policy.authorize(request, channel)
        identity = request.identity
        if channel.startswith(DEVICE_CHANNEL_PREFIX) and identity is not None:
            if channel == self._own_channel(identity):
                return True
            return Deny("another device's channel")
        return Deny("no such channel")

    @staticmethod
    def _own_channel(identity: Identity) -> str | None:
        # The identity's tag is its restaurant id (as AccessPolicy.identify makes it).
        restaurants = [tag for tag in identity.tags if _RESTAURANT_ID.fullmatch(tag) is not None]
        return device_channel(restaurants[0], identity.id) if len(restaurants) == 1 else None


async def send_device_message(
    broadcaster: Broadcaster, restaurant_id: str, device_id: str, text: str, *, sender: str | None
) -> tuple[str, int]:
    """Publish a :class:`DeviceMessage` on the device's channel; return the channel and the event's seq.

    Raises:
        RTBroadcastError: the broadcast backend could not take it (nothing was sent).
    """
    channel = device_channel(restaurant_id, device_id)
    event = DeviceMessage(restaurant_id=restaurant_id, device_id=device_id, text=text, sender=sender)
    seq = await broadcaster.publish(channel, event)
    logger.info("device message to %s restaurant=%s seq=%d", device_id, restaurant_id, seq)
    return channel, seq
