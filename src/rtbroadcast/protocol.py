"""The wire protocol, sans I/O: decode client frames, encode server frames, decide how a client resumes.

Nothing here awaits or touches a socket: frames go in as ``str``/``bytes`` and come out as dataclasses,
and the other way round. The adapters in :mod:`rtbroadcast.asgi` only move the results over a transport.

Server -> client frames are JSON text. Application events keep the shape their model declares plus ``seq``
(:func:`check_event_payload` holds the rules an event's JSON must follow, :func:`with_seq` adds the seq);
the protocol's own frames are :class:`Welcome`, :class:`Pong`, :class:`ErrorFrame` and
:class:`ResyncRequired`. Client -> server frames are :class:`Ping` only; resume points travel as query
parameters (``epoch`` and ``last_seq``) when the connection opens.

Protocol 2 (``?protocol=2``) carries many channels on one connection. The client sends :class:`Subscribe`
and :class:`Unsubscribe` (and :class:`Ping`); the server answers with :class:`WelcomeV2` first, then
:class:`Subscribed`, :class:`Unsubscribed`, :class:`ErrorFrameV2` (with the request id), and wraps every
event in ``{"type":"event","channel":C,"event":<the protocol-1 frame>}`` (:func:`event_frame_prefix`,
:class:`ChannelEvent`); its :class:`ResyncRequired` names its channel. Presence frames
(:class:`PresenceJoin`, :class:`PresenceLeave`) go only to subscriptions that asked for them.

The rules that decide what goes on the wire live here too: which channel names are valid
(:func:`is_valid_channel`), where an event's ``seq`` goes (:func:`with_seq`), and whether a client resumes
or must resync (:func:`resync_reason`), and, on the client side, what to do with an incoming event
(:func:`judge_event`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final, Literal, TypeAlias

from .errors import (
    ConfigurationError,
    FrameTooLarge,
    InvalidChannel,
    InvalidEvent,
    InvalidFrame,
    MalformedFrame,
    UnknownMessageType,
)

# The presence types are the presence module's (one definition for the backends, the broadcaster and the
# wire); re-exported here with the frames that carry them.
from .presence import PresenceMember, PresenceSnapshot

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "ENVELOPE_FIELDS",
    "MAX_POSITIONS_TOKEN",
    "PROTOCOL_TYPES",
    "PROTOCOL_VERSION",
    "PROTOCOL_VERSIONS",
    "ChannelEvent",
    "ClientFrame",
    "CloseCode",
    "ErrorFrame",
    "ErrorFrameV2",
    "EventFrame",
    "ObservedCloseCode",
    "Ping",
    "Pong",
    "PresenceJoin",
    "PresenceLeave",
    "PresenceMember",
    "PresenceSnapshot",
    "ResumePoint",
    "ResyncReason",
    "ResyncRequired",
    "ServerFrame",
    "Subscribe",
    "Subscribed",
    "SubscriptionErrorCode",
    "Unsubscribe",
    "UnsubscribeReason",
    "Unsubscribed",
    "Welcome",
    "WelcomeV2",
    "check_event_payload",
    "decode_client_frame",
    "decode_positions",
    "decode_server_frame",
    "encode_client_frame",
    "encode_positions",
    "encode_server_frame",
    "event_frame",
    "event_frame_prefix",
    "is_valid_channel",
    "is_valid_request_id",
    "parse_protocol",
    "parse_resume_point",
    "resync_reason",
    "seq_prefix",
    "validate_channel",
    "with_seq",
]

#: Version of the wire protocol, sent in every :class:`Welcome` (protocol 1's welcome).
PROTOCOL_VERSION: Final = 1
#: Every version of the wire protocol this server speaks; a client picks one with ``?protocol=N``.
PROTOCOL_VERSIONS: Final = (1, 2)
#: Default limit on the size of one client frame, in bytes (text is measured as UTF-8).
DEFAULT_MAX_FRAME_SIZE: Final = 16 * 1024
#: ``type`` values of the protocol's own frames; an application event may not use them.
PROTOCOL_TYPES: frozenset[str] = frozenset({"welcome", "ping", "pong", "error", "resync_required"})
#: Fields the server adds to every application event; an event may not carry them itself.
ENVELOPE_FIELDS: frozenset[str] = frozenset({"seq"})


class CloseCode(IntEnum):
    """WebSocket close codes the server uses, and what a client should do about each."""

    #: The connection ended normally.
    NORMAL = 1000
    #: The server is shutting down or restarting: reconnect with resume (the next process answers). Sent to
    #: every connection by ``Broadcaster.drain()``, which the lifespan helper runs on SIGTERM or SIGINT
    #: before the ASGI server closes anything, and by ``Broadcaster.disconnect()``.
    GOING_AWAY = 1001
    #: A client frame exceeded the ASGI server's frame limit (uvicorn: ``ws_max_size``; run it equal to the
    #: endpoint's ``max_frame_size``): refused from its header, unread. Do not resend that frame.
    MESSAGE_TOO_BIG = 1009
    #: An unexpected server error: reconnect with resume, with backoff.
    INTERNAL_ERROR = 1011
    #: A connection limit (per channel or per process) is reached: reconnect later, with backoff.
    TRY_AGAIN_LATER = 1013
    #: The client fell behind its outbound queue bound: reconnect with resume. It arrives after the events
    #: already handed to the socket; a client that does not read it within 10 s sees the connection drop
    #: without a close frame (1006) instead (see Backpressure).
    SLOW_CONSUMER = 4001
    #: Nothing was heard from the client within the heartbeat timeout: reconnect with resume.
    HEARTBEAT_TIMEOUT = 4002
    #: Not allowed: the ``authorize`` hook denied the channel, or the Origin is not allowed; or the service
    #: closed the connection (``Broadcaster.disconnect_connections()``, a banned user, say). Do not retry
    #: with the same credentials. With the reason ``token expired``: the credentials the connection was
    #: opened with expired (``Identity.expires_at``); get fresh ones, then reconnect with resume.
    FORBIDDEN = 4003
    #: The connection request is invalid (no channel, bad resume parameters). Do not retry unchanged.
    BAD_REQUEST = 4004
    #: The client sent more messages per second than allowed: reconnect with resume, with backoff.
    RATE_LIMITED = 4008


class ObservedCloseCode(IntEnum):
    """Close codes a client can observe that rtbroadcast never sends: the ASGI server's and the network's.

    The protocol reference lists them in one table with :class:`CloseCode`, so that a client developer
    sees every code a real client gets.
    """

    #: No close frame at all (client libraries report ``1006``; it never travels on the wire): the network
    #: dropped, a proxy cut the connection, or the server process was killed (``kill -9``, out of memory).
    #: Reconnect with resume, with backoff.
    ABNORMAL_CLOSURE = 1006
    #: Sent by uvicorn itself when it stops with the connection still open, which happens only where no
    #: drain ran first (no lifespan helper, ``drain_on_signal=False``, uvicorn outside the main thread).
    #: Treat it like ``1001``: reconnect with resume, with backoff.
    SERVICE_RESTART = 1012


class ResyncReason:
    """Why a :class:`ResyncRequired` was sent. Plain strings on the wire."""

    #: The stream's epoch differs from the client's: history was lost (the backend restarted, its keys
    #: expired, or the memory backend dropped the channel after ``idle_ttl`` without publishes).
    EPOCH_CHANGED: Final = "epoch_changed"
    #: The events after the client's ``last_seq`` are no longer all in history (trimmed by size or age),
    #: or more were missed than one resume may replay (the broadcaster's ``max_resume``, 1000 by default).
    HISTORY_TRIMMED: Final = "history_trimmed"
    #: More events were missed than the connection's outbound queue holds (``QueueLimits``): replaying
    #: them would close it as a slow consumer on every reconnect. Reload the snapshot instead.
    TOO_FAR_BEHIND: Final = "too_far_behind"
    #: The client's ``last_seq`` is ahead of the stream: it belongs to some other stream.
    SEQ_AHEAD: Final = "seq_ahead"
    #: The server lost contact with the backend and may have missed events.
    BACKEND_INTERRUPTED: Final = "backend_interrupted"


# -- client -> server -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    """``{"type": "ping"}``: the client checks the connection; the server answers with :class:`Pong`."""


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Protocol 2: ``{"type": "subscribe", "id": "r1", "channel": "room:1"}``, optionally resuming.

    ``id`` is the client's request id, echoed in the answer (:class:`Subscribed` or :class:`ErrorFrameV2`).
    ``resume`` comes from ``epoch`` and ``last_seq`` (both or neither). ``presence`` asks for the channel's
    presence snapshot in :class:`Subscribed` and for its join/leave frames.
    """

    id: str
    channel: str
    resume: ResumePoint | None = None
    presence: bool = False


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Protocol 2: ``{"type": "unsubscribe", "id": "r3", "channel": "room:1"}``."""

    id: str
    channel: str


ClientFrame: TypeAlias = Ping | Subscribe | Unsubscribe

#: The ``type`` values a client may send, per protocol version.
_CLIENT_TYPES: Final = {1: "ping", 2: "ping, subscribe, unsubscribe"}


def decode_client_frame(
    data: str | bytes, *, max_size: int = DEFAULT_MAX_FRAME_SIZE, protocol: int = 1
) -> ClientFrame:
    """Decode one frame received from a client.

    Args:
        data: the frame's payload; ``bytes`` must be UTF-8.
        max_size: the largest payload accepted, in bytes.
        protocol: the connection's protocol version; only protocol 2 accepts ``subscribe`` and
            ``unsubscribe`` (protocol 1 answers them with ``unknown_type``, as it always has).

    Raises:
        FrameTooLarge: the payload is longer than ``max_size``.
        MalformedFrame: it is not a UTF-8 JSON object with a string ``type``.
        UnknownMessageType: the ``type`` is not one a client may send.
        InvalidFrame: a ``subscribe`` or ``unsubscribe`` without a valid ``id`` (``request_id`` is then
            ``None``), or with a field of the wrong type or out of range (``request_id`` is set).
        InvalidChannel: its ``channel`` is not a valid channel name (``request_id`` is set).
    """
    size = len(data) if isinstance(data, bytes) else _utf8_size(data, max_size)
    if size > max_size:
        raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {max_size} bytes")
    obj = _load_object(data)
    frame_type = obj["type"]
    if frame_type == "ping":
        return Ping()
    if protocol >= 2 and frame_type in ("subscribe", "unsubscribe"):
        return _decode_request(obj, frame_type)
    request_id = obj.get("id") if protocol >= 2 and is_valid_request_id(obj.get("id")) else None
    raise UnknownMessageType(
        f"unknown message type {_short(frame_type)}; clients may send: {_CLIENT_TYPES.get(protocol, 'ping')}",
        request_id=request_id,
    )


#: A request id: 1 to 64 characters, no control characters, valid Unicode (no lone surrogates).
_REQUEST_ID_RE: Final = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]{1,64}")
_SUBSCRIBE_FIELDS: Final = ("epoch", "last_seq", "presence")


def is_valid_request_id(value: object) -> bool:
    """Return whether ``value`` is a valid protocol-2 request id (1 to 64 characters, no control ones)."""
    return isinstance(value, str) and _REQUEST_ID_RE.fullmatch(value) is not None


def _decode_request(obj: Mapping[str, Any], frame_type: str) -> Subscribe | Unsubscribe:
    request_id = obj.get("id")
    if not is_valid_request_id(request_id):
        raise InvalidFrame(
            f"{frame_type!r} needs an 'id': a string of 1 to 64 characters without control characters"
        )
    assert isinstance(request_id, str)
    channel = obj.get("channel")
    if not is_valid_channel(channel):
        raise InvalidChannel(
            f"{frame_type!r} needs a 'channel' of 1 to 256 characters without control characters",
            request_id=request_id,
        )
    assert isinstance(channel, str)
    if frame_type == "unsubscribe":
        return Unsubscribe(request_id, channel)
    epoch = obj.get("epoch")
    last_seq = obj.get("last_seq")
    resume = None
    if epoch is not None or last_seq is not None:
        if epoch is None or last_seq is None:
            raise InvalidFrame(
                "resume needs both 'epoch' and 'last_seq'", request_id=request_id, channel=channel
            )
        if not isinstance(epoch, str) or not epoch or len(epoch) > 128 or not _is_unicode(epoch):
            raise InvalidFrame(
                "'epoch' must be a string of 1 to 128 characters", request_id=request_id, channel=channel
            )
        if not isinstance(last_seq, int) or isinstance(last_seq, bool) or not 0 <= last_seq <= _MAX_SEQ:
            raise InvalidFrame(
                f"'last_seq' must be an integer from 0 to {_MAX_SEQ}", request_id=request_id, channel=channel
            )
        resume = ResumePoint(epoch, last_seq)
    presence = obj.get("presence", False)
    if not isinstance(presence, bool):
        raise InvalidFrame("'presence' must be true or false", request_id=request_id, channel=channel)
    return Subscribe(request_id, channel, resume, presence)


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_client_frame(frame: ClientFrame) -> str:
    """Encode a client frame (used by clients and tests)."""
    if isinstance(frame, Ping):
        return '{"type":"ping"}'
    if isinstance(frame, Subscribe):
        obj: dict[str, Any] = {"type": "subscribe", "id": frame.id, "channel": frame.channel}
        if frame.resume is not None:
            obj["epoch"] = frame.resume.epoch
            obj["last_seq"] = frame.resume.seq
        if frame.presence:
            obj["presence"] = True
        return _dumps(obj)
    if isinstance(frame, Unsubscribe):
        return _dumps({"type": "unsubscribe", "id": frame.id, "channel": frame.channel})
    raise TypeError(f"not a client frame: {frame!r}")


def parse_protocol(query: Mapping[str, str]) -> int:
    """Read the protocol version a client asks for from the ``protocol`` query parameter (default 1).

    Raises:
        InvalidFrame: the value is not one of :data:`PROTOCOL_VERSIONS`; the message says which the server
            speaks (the endpoint closes with ``4004`` and this message).
    """
    value = query.get("protocol")
    if value is None or value == "1":
        return 1
    if value == "2":
        return 2
    spoken = " and ".join(str(version) for version in PROTOCOL_VERSIONS)
    raise InvalidFrame(f"unsupported protocol {_short(value, 16)}; this server speaks {spoken}")


def _utf8_size(text: str, limit: int) -> int:
    # A str is at most 4 bytes per character in UTF-8: skip encoding when it cannot matter.
    if len(text) * 4 <= limit:
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return len(text.encode("utf-8", "surrogatepass"))


def _load_object(data: str | bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except UnicodeDecodeError:
        raise MalformedFrame("frame is not valid UTF-8") from None
    except RecursionError:
        raise MalformedFrame("frame is nested too deeply") from None
    except ValueError as exc:
        raise MalformedFrame(f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedFrame(f"frame must be a JSON object, not {type(obj).__name__}")
    if not isinstance(obj.get("type"), str):
        raise MalformedFrame("frame must have a string 'type'")
    return obj


def _short(value: str, limit: int = 64) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


# -- server -> client -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome:
    """First frame on every connection: where the client stands in the channel's stream.

    ``seq`` is the last event the client has (or, without resume, the channel's current seq): every event
    that follows has a higher one. ``resumed`` is true when a requested resume succeeded.
    """

    channel: str
    epoch: str
    seq: int
    heartbeat_interval: float
    resumed: bool = False
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a client's :class:`Ping`; ``timestamp`` is the server's clock."""

    timestamp: str


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """A client frame was rejected; the connection stays open unless a close frame follows."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class ResyncRequired:
    """The client cannot be brought up to date by events: reload the snapshot, then continue.

    Events that follow have seqs after ``seq`` in ``epoch``. On protocol 2 (and in multi-channel in-process
    subscriptions) ``channel`` names the channel it is about; protocol 1 never sends it.
    """

    reason: str
    epoch: str
    seq: int
    channel: str | None = None


@dataclass(frozen=True, slots=True)
class EventFrame:
    """An application event as a client sees it: its ``type``, its ``seq`` and all its fields."""

    type: str
    seq: int
    data: dict[str, Any]


# -- server -> client, protocol 2 --------------------------------------------------------------------


class SubscriptionErrorCode:
    """``code`` values of protocol 2's ``error`` frames about one subscription, beyond the frame errors.

    Plain strings on the wire; the frame errors (``malformed_frame``, ``invalid_frame``, ...) are the
    :class:`~rtbroadcast.ProtocolError` codes.
    """

    #: The ``authorize`` hook denied the channel (``message`` is its reason). Do not retry unchanged.
    FORBIDDEN: Final = "forbidden"
    #: The connection already follows this channel; the existing subscription is untouched.
    ALREADY_SUBSCRIBED: Final = "already_subscribed"
    #: ``unsubscribe`` of a channel the connection does not follow.
    NOT_SUBSCRIBED: Final = "not_subscribed"
    #: The connection follows ``max_subscriptions`` channels already (server-side ones included).
    TOO_MANY_SUBSCRIPTIONS: Final = "too_many_subscriptions"
    #: The channel's connection limit is reached, or the backend is unavailable: retry later, with backoff.
    TRY_AGAIN_LATER: Final = "try_again_later"
    #: Presence was asked for on a channel that has none; the subscription itself succeeded (this error
    #: follows its ``subscribed``).
    PRESENCE_UNAVAILABLE: Final = "presence_unavailable"


class UnsubscribeReason:
    """``reason`` values of protocol 2's ``unsubscribed`` frame."""

    #: The client asked (an ``unsubscribe`` frame; ``id`` is its request id).
    CLIENT: Final = "client"
    #: The service ended the subscription (``id`` is ``null``).
    SERVER: Final = "server"


@dataclass(frozen=True, slots=True)
class WelcomeV2:
    """Protocol 2's first frame: no channel; ``connection`` is this connection's opaque id.

    The same id is the ``client`` of this connection's presence members. Server-side subscriptions made at
    connect follow as :class:`Subscribed` frames with ``id`` ``None``.
    """

    heartbeat_interval: float
    connection: str
    protocol: int = 2


@dataclass(frozen=True, slots=True)
class Subscribed:
    """Protocol 2: a subscription started, at ``epoch``/``seq`` (like protocol 1's welcome, per channel).

    ``id`` is the client's request id, or ``None`` for a subscription the server made. ``presence`` is the
    channel's snapshot when the request asked for it and the channel has presence.
    """

    id: str | None
    channel: str
    epoch: str
    seq: int
    resumed: bool = False
    presence: PresenceSnapshot | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """Protocol 2: a subscription ended; no event of ``channel`` follows on this connection."""

    id: str | None
    channel: str
    reason: str = UnsubscribeReason.CLIENT


@dataclass(frozen=True, slots=True)
class ErrorFrameV2:
    """Protocol 2's ``error``: a request (``id``, ``None`` if it had none) was rejected; the rest stays.

    ``channel`` is the request's channel where it named a valid one.
    """

    id: str | None
    code: str
    message: str
    channel: str | None = None


@dataclass(frozen=True, slots=True)
class ChannelEvent:
    """Protocol 2: an application event of ``channel``, exactly its protocol-1 frame (``event``)."""

    channel: str
    event: EventFrame


@dataclass(frozen=True, slots=True)
class PresenceJoin:
    """Protocol 2: ``member`` joined ``channel`` (only to subscriptions that asked for presence)."""

    channel: str
    member: PresenceMember


@dataclass(frozen=True, slots=True)
class PresenceLeave:
    """Protocol 2: ``member`` left ``channel`` (only to subscriptions that asked for presence)."""

    channel: str
    member: PresenceMember


ServerFrame: TypeAlias = (
    Welcome
    | Pong
    | ErrorFrame
    | ResyncRequired
    | EventFrame
    | WelcomeV2
    | Subscribed
    | Unsubscribed
    | ErrorFrameV2
    | ChannelEvent
    | PresenceJoin
    | PresenceLeave
)

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _member(member: PresenceMember) -> dict[str, Any]:
    return {"client": member.client, "identity": member.identity, "info": dict(member.info)}


def encode_server_frame(frame: ServerFrame) -> str:
    """Encode a server frame as JSON text."""
    if isinstance(frame, Welcome):
        return _dumps(
            {
                "type": "welcome",
                "channel": frame.channel,
                "epoch": frame.epoch,
                "seq": frame.seq,
                "heartbeat_interval": frame.heartbeat_interval,
                "resumed": frame.resumed,
                "protocol": frame.protocol,
            }
        )
    if isinstance(frame, Pong):
        return _dumps({"type": "pong", "timestamp": frame.timestamp})
    if isinstance(frame, ErrorFrame):
        return _dumps({"type": "error", "code": frame.code, "message": frame.message})
    if isinstance(frame, ResyncRequired):
        if frame.channel is None:
            return _dumps(
                {"type": "resync_required", "reason": frame.reason, "epoch": frame.epoch, "seq": frame.seq}
            )
        return _dumps(
            {
                "type": "resync_required",
                "channel": frame.channel,
                "reason": frame.reason,
                "epoch": frame.epoch,
                "seq": frame.seq,
            }
        )
    if isinstance(frame, EventFrame):
        return _dumps({**frame.data, "type": frame.type, "seq": frame.seq})
    if isinstance(frame, WelcomeV2):
        return _dumps(
            {
                "type": "welcome",
                "protocol": frame.protocol,
                "heartbeat_interval": frame.heartbeat_interval,
                "connection": frame.connection,
            }
        )
    if isinstance(frame, Subscribed):
        obj: dict[str, Any] = {
            "type": "subscribed",
            "id": frame.id,
            "channel": frame.channel,
            "epoch": frame.epoch,
            "seq": frame.seq,
            "resumed": frame.resumed,
        }
        if frame.presence is not None:
            obj["presence"] = {
                "count": frame.presence.count,
                "members": [_member(member) for member in frame.presence.members],
                "truncated": frame.presence.truncated,
            }
        return _dumps(obj)
    if isinstance(frame, Unsubscribed):
        return _dumps(
            {"type": "unsubscribed", "id": frame.id, "channel": frame.channel, "reason": frame.reason}
        )
    if isinstance(frame, ErrorFrameV2):
        return _dumps(
            {
                "type": "error",
                "id": frame.id,
                "channel": frame.channel,
                "code": frame.code,
                "message": frame.message,
            }
        )
    if isinstance(frame, ChannelEvent):
        return event_frame(frame.channel, encode_server_frame(frame.event))
    if isinstance(frame, PresenceJoin | PresenceLeave):
        kind = "presence_join" if isinstance(frame, PresenceJoin) else "presence_leave"
        return _dumps({"type": kind, "channel": frame.channel, "member": _member(frame.member)})
    raise TypeError(f"not a server frame: {frame!r}")


#: Per-channel prefixes of protocol 2's event frame; cleared whole when it grows past this many channels.
_PREFIX_CACHE_SIZE: Final = 4096
_prefixes: dict[str, str] = {}


def event_frame_prefix(channel: str) -> str:
    """Return ``'{"type":"event","channel":<channel>,"event":'``, cached per channel."""
    prefix = _prefixes.get(channel)
    if prefix is None:
        if len(_prefixes) >= _PREFIX_CACHE_SIZE:
            _prefixes.clear()
        prefix = _prefixes[channel] = '{"type":"event","channel":' + _dumps(channel) + ',"event":'
    return prefix


def event_frame(channel: str, data: str) -> str:
    """Wrap an event's protocol-1 text ``data`` (``seq`` included) in protocol 2's ``event`` frame.

    String concatenation, no parsing: the event's own text is carried unchanged.
    """
    return event_frame_prefix(channel) + data + "}"


def decode_server_frame(data: str | bytes) -> ServerFrame:
    """Decode a frame received from the server (for clients, tools and tests), of either protocol.

    Raises:
        MalformedFrame: it is not a JSON object with a string ``type``.
        InvalidFrame: a protocol frame or an event lacks a field or has one of the wrong type.
    """
    obj = _load_object(data)
    return _decode_server_object(obj)


def _decode_server_object(obj: dict[str, Any]) -> ServerFrame:
    frame_type = obj["type"]
    if frame_type == "welcome":
        if "channel" not in obj and "connection" in obj:
            return WelcomeV2(
                heartbeat_interval=float(_field(obj, "heartbeat_interval", (int, float))),
                connection=_field(obj, "connection", str),
                protocol=_int_field(obj, "protocol"),
            )
        return Welcome(
            channel=_field(obj, "channel", str),
            epoch=_field(obj, "epoch", str),
            seq=_int_field(obj, "seq"),
            heartbeat_interval=float(_field(obj, "heartbeat_interval", (int, float))),
            resumed=_field(obj, "resumed", bool),
            protocol=_int_field(obj, "protocol"),
        )
    if frame_type == "pong":
        return Pong(timestamp=_field(obj, "timestamp", str))
    if frame_type == "error":
        if "id" in obj:
            return ErrorFrameV2(
                id=_optional_field(obj, "id", str),
                code=_field(obj, "code", str),
                message=_field(obj, "message", str),
                channel=_optional_field(obj, "channel", str),
            )
        return ErrorFrame(code=_field(obj, "code", str), message=_field(obj, "message", str))
    if frame_type == "resync_required":
        return ResyncRequired(
            reason=_field(obj, "reason", str),
            epoch=_field(obj, "epoch", str),
            seq=_int_field(obj, "seq"),
            channel=_optional_field(obj, "channel", str),
        )
    if frame_type == "event" and isinstance(obj.get("event"), dict) and "channel" in obj:
        inner = obj["event"]
        if not isinstance(inner.get("type"), str):
            raise InvalidFrame("'event' frame needs an 'event' object with a string 'type'")
        event = _decode_server_object(inner)
        if not isinstance(event, EventFrame):
            raise InvalidFrame("'event' frame wraps a protocol frame, not an event")
        return ChannelEvent(channel=_field(obj, "channel", str), event=event)
    if frame_type == "subscribed":
        presence = obj.get("presence")
        return Subscribed(
            id=_optional_field(obj, "id", str),
            channel=_field(obj, "channel", str),
            epoch=_field(obj, "epoch", str),
            seq=_int_field(obj, "seq"),
            resumed=_field(obj, "resumed", bool),
            presence=None if presence is None else _snapshot(presence),
        )
    if frame_type == "unsubscribed":
        return Unsubscribed(
            id=_optional_field(obj, "id", str),
            channel=_field(obj, "channel", str),
            reason=_field(obj, "reason", str),
        )
    if frame_type in ("presence_join", "presence_leave") and "member" in obj:
        member = _presence_member(obj.get("member"))
        channel = _field(obj, "channel", str)
        if frame_type == "presence_join":
            return PresenceJoin(channel, member)
        return PresenceLeave(channel, member)
    seq = _int_field(obj, "seq")
    data_fields = {k: v for k, v in obj.items() if k not in ("type", "seq")}
    return EventFrame(type=frame_type, seq=seq, data=data_fields)


def _snapshot(value: object) -> PresenceSnapshot:
    if not isinstance(value, dict):
        raise InvalidFrame("'presence' must be an object with 'count', 'members' and 'truncated'")
    members = value.get("members")
    if not isinstance(members, list):
        raise InvalidFrame("'presence' needs a 'members' array")
    return PresenceSnapshot(
        count=_int_field({"type": "presence", **value}, "count"),
        members=tuple(_presence_member(member) for member in members),
        truncated=_field({"type": "presence", **value}, "truncated", bool),
    )


def _presence_member(value: object) -> PresenceMember:
    if not isinstance(value, dict):
        raise InvalidFrame("a presence member must be an object with 'client', 'identity' and 'info'")
    obj = {"type": "member", **value}
    info = obj.get("info")
    if not isinstance(info, dict):
        raise InvalidFrame("a presence member needs an 'info' object")
    return PresenceMember(
        client=_field(obj, "client", str), identity=_optional_field(obj, "identity", str), info=info
    )


def _optional_field(obj: Mapping[str, Any], name: str, kind: type[Any]) -> Any:
    if obj.get(name) is None:
        return None
    return _field(obj, name, kind)


def _field(obj: Mapping[str, Any], name: str, kind: type[Any] | tuple[type[Any], ...]) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidFrame(f"{obj['type']!r} frame needs {name!r} of type {_kind_name(kind)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidFrame(f"{obj['type']!r} frame needs a finite {name!r}")
    return value


def _int_field(obj: Mapping[str, Any], name: str) -> int:
    value: int = _field(obj, name, int)
    return value


def _kind_name(kind: type[Any] | tuple[type[Any], ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


# -- application events ---------------------------------------------------------------------------
#
# An event travels as the publisher's JSON object with "seq" appended to its text: the text is never
# parsed again after the publish, so every rule about its shape is checked once, here, before it is.


def check_event_payload(payload: object) -> str:
    """Check that ``payload`` is the text of an event clients can read; return it without outer whitespace.

    An event is a JSON object with a non-empty string ``type`` that is not one of :data:`PROTOCOL_TYPES`,
    no ``seq`` (the server adds it), no key given twice, no ``NaN`` or ``Infinity`` (which are not JSON),
    and text that is valid Unicode (no lone surrogates).

    Raises:
        InvalidEvent: the payload breaks one of these rules; the message says which.
    """
    if not isinstance(payload, str):
        raise InvalidEvent(f"an event payload must be str (JSON text), not {type(payload).__name__}")
    text = payload.strip()
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidEvent(f"event payload is not valid Unicode: {exc.reason} at {exc.start}") from None
    try:
        # The C scanner itself, without JSONDecoder.decode()'s two whitespace regexes: strip() left none.
        obj, end = _scan_event(text, 0)
    except InvalidEvent:
        raise
    except RecursionError:
        raise InvalidEvent("event payload is nested too deeply") from None
    except StopIteration as exc:  # the scanner's "no value at this index"
        problem = (
            "Unexpected UTF-8 BOM (decode using utf-8-sig)" if text[:1] == "\ufeff" else "Expecting value"
        )
        raise _not_json(json.JSONDecodeError(problem, text, exc.value)) from None
    except ValueError as exc:
        raise _not_json(exc) from None
    if end != len(text):  # at the next value, as json.loads() says (JSON whitespace in between)
        extra = len(text) - len(text[end:].lstrip(" \t\n\r"))
        raise _not_json(json.JSONDecodeError("Extra data", text, extra))
    if not isinstance(obj, dict):
        raise InvalidEvent(f"event payload must be a JSON object, not {_json_kind(obj)}")
    check_event_fields(obj)
    return text


def check_event_fields(obj: Mapping[str, Any]) -> None:
    """Check the top-level keys of a decoded event (see :func:`check_event_payload`).

    Raises:
        InvalidEvent: ``type`` is missing, not a non-empty string, or reserved; or ``seq`` is present.
    """
    event_type = obj.get("type")
    if not isinstance(event_type, str) or not event_type:
        got = "none" if "type" not in obj else repr(event_type)
        raise InvalidEvent(f"an event needs a non-empty string 'type' (got {got})")
    if event_type in PROTOCOL_TYPES:
        raise InvalidEvent(
            f"event type {event_type!r} is reserved for the protocol's own frames "
            f"({', '.join(sorted(PROTOCOL_TYPES))})"
        )
    taken = ENVELOPE_FIELDS.intersection(obj)
    if taken:
        raise InvalidEvent(
            f"an event may not carry {', '.join(sorted(taken))!r}: the server adds it to every event"
        )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidEvent(f"event payload has the key {_short(key)} twice")
            seen.add(key)
    return obj


def _no_constant(name: str) -> Any:
    raise InvalidEvent(f"event payload contains {name}, which is not JSON (clients cannot parse it)")


# One scanner for every payload: json.loads() with hooks builds a decoder and its scanner per call, which
# was a third of what checking a small event cost.
# (``scan_once`` is the decoder's C scanner, an instance attribute typeshed does not declare.)
_scan_event: Final[Callable[[str, int], tuple[Any, int]]] = vars(
    json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)
)["scan_once"]


def _not_json(error: ValueError) -> InvalidEvent:
    return InvalidEvent(f"event payload is not valid JSON: {error}")


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def seq_prefix(payload: str) -> str:
    """Return the envelope text up to its seq: ``seq_prefix(p) + str(seq) + "}" == with_seq(p, seq)``.

    ``payload`` must be the text of a JSON object (:func:`check_event_payload` checks it).
    """
    body = payload.rstrip()
    if body == "{}":
        return '{"seq":'
    return body[:-1] + ',"seq":'


def with_seq(payload: str, seq: int) -> str:
    """Append ``"seq": seq`` to a JSON object's text without parsing it again.

    ``payload`` must be the text of a JSON object without ``seq``, as :meth:`Event.to_json` produces and
    :func:`check_event_payload` checks.
    """
    return f"{seq_prefix(payload)}{seq}}}"


# -- resume ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a reconnecting client left off: the stream's ``epoch`` and the last ``seq`` it applied.

    Raises:
        ConfigurationError: ``epoch`` is not a string, or ``seq`` is not an integer >= 0 (a seq kept as
            text, say: ``ResumePoint(epoch, int(stored))``).
    """

    epoch: str
    seq: int

    def __post_init__(self) -> None:
        if not isinstance(self.epoch, str):
            raise ConfigurationError(f"ResumePoint.epoch must be a string, not {type(self.epoch).__name__}")
        if not isinstance(self.seq, int) or isinstance(self.seq, bool) or self.seq < 0:
            raise ConfigurationError(f"ResumePoint.seq must be an integer >= 0, not {self.seq!r}")


#: Largest seq a client may claim; bigger numbers are certainly not ours (and would cost to parse).
_MAX_SEQ: Final = 2**63 - 1


def parse_resume_point(query: Mapping[str, str]) -> ResumePoint | None:
    """Read the resume point from connection query parameters ``epoch`` and ``last_seq``.

    Both absent means a fresh connection (``None``).

    Raises:
        InvalidFrame: only one of them is given, or ``last_seq`` is not a non-negative integer.
    """
    epoch = query.get("epoch")
    last_seq = query.get("last_seq")
    if epoch is None and last_seq is None:
        return None
    if not epoch or last_seq is None:
        raise InvalidFrame("resume needs both 'epoch' and 'last_seq' query parameters")
    if not (last_seq.isascii() and last_seq.isdigit()) or len(last_seq) > 19 or int(last_seq) > _MAX_SEQ:
        raise InvalidFrame(f"'last_seq' must be a non-negative integer, not {_short(last_seq)}")
    if len(epoch) > 128:
        raise InvalidFrame("'epoch' is longer than 128 characters")
    return ResumePoint(epoch=epoch, seq=int(last_seq))


def encode_positions(positions: Mapping[str, ResumePoint]) -> str:
    """Encode several channels' positions as one token: base64url (unpadded) of compact JSON.

    The JSON is ``{"channel": ["epoch", seq], ...}``. Protocol 2 takes it as the ``resume`` query parameter
    (server-side subscriptions made at connect resume from it) and SSE may use it as an event ``id``.
    """
    obj = {channel: [point.epoch, point.seq] for channel, point in positions.items()}
    text = _dumps(obj).encode("utf-8")
    return base64.urlsafe_b64encode(text).rstrip(b"=").decode("ascii")


#: Longest positions token accepted (characters): 128 subscriptions of long names and epochs fit.
MAX_POSITIONS_TOKEN: Final = 64 * 1024


def decode_positions(token: str) -> dict[str, ResumePoint]:
    """Decode a token of :func:`encode_positions`.

    Raises:
        InvalidFrame: the token is not base64url of a JSON object mapping valid channel names to
            ``[epoch, seq]`` pairs (same bounds as the ``epoch``/``last_seq`` query parameters), or is
            longer than :data:`MAX_POSITIONS_TOKEN`.
    """
    if len(token) > MAX_POSITIONS_TOKEN:
        raise InvalidFrame(f"the resume token is longer than {MAX_POSITIONS_TOKEN} characters")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        obj = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        raise InvalidFrame("the resume token is not base64url of a JSON object") from None
    if not isinstance(obj, dict):
        raise InvalidFrame("the resume token is not base64url of a JSON object")
    positions: dict[str, ResumePoint] = {}
    for channel, point in obj.items():
        if not is_valid_channel(channel):
            raise InvalidFrame(f"the resume token names an invalid channel {_short(str(channel))}")
        if (
            not isinstance(point, list)
            or len(point) != 2
            or not isinstance(point[0], str)
            or not 0 < len(point[0]) <= 128
            or not isinstance(point[1], int)
            or isinstance(point[1], bool)
            or not 0 <= point[1] <= _MAX_SEQ
        ):
            raise InvalidFrame(f"the resume token's position of {_short(channel)} is not [epoch, seq]")
        positions[channel] = ResumePoint(point[0], point[1])
    return positions


def resync_reason(
    resume: ResumePoint, epoch: str, seq: int, *, complete: bool, fits: bool = True
) -> str | None:
    """Decide whether a client at ``resume`` can be brought up to date, or why it must resync.

    Args:
        resume: where the client (or a cursor repairing a gap) left off.
        epoch: the stream's epoch now.
        seq: the stream's last seq now.
        complete: whether history still holds every event after ``resume.seq`` (up to the read limit).
        fits: whether the missed events fit in the connection's outbound queue at once.

    Returns:
        ``None`` when the events after ``resume.seq`` can be replayed from history (the client resumes);
        otherwise the :class:`ResyncReason` to send in a :class:`ResyncRequired`, checked in this order:
        another epoch (``epoch_changed``), a seq beyond the stream's top (``seq_ahead``), missing history
        (``history_trimmed``), more missed events than the connection's queue holds (``too_far_behind``).
        There is no partial recovery: a client either gets every missed event or resyncs.
    """
    if epoch != resume.epoch:
        return ResyncReason.EPOCH_CHANGED
    if resume.seq > seq:
        return ResyncReason.SEQ_AHEAD
    if not complete:
        return ResyncReason.HISTORY_TRIMMED
    if not fits:
        return ResyncReason.TOO_FAR_BEHIND
    return None


# -- channel names ---------------------------------------------------------------------------------

# Lone surrogates are refused too: a name must be valid Unicode to reach Redis or a client as UTF-8.
_CHANNEL_RE: Final = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]{1,256}")


def is_valid_channel(channel: object) -> bool:
    """Return whether ``channel`` is a valid channel name (see :func:`validate_channel`)."""
    return isinstance(channel, str) and _CHANNEL_RE.fullmatch(channel) is not None


def validate_channel(channel: str) -> None:
    """Check a channel name: 1 to 256 characters, no control characters, valid Unicode.

    Raises:
        ConfigurationError: the name is invalid.
    """
    if not is_valid_channel(channel):
        raise ConfigurationError(
            f"invalid channel name {channel!r}: use 1 to 256 characters, no control characters"
        )


# ==================================================================================================
# Client side: what a client does with an incoming event (sans I/O).
#
# Kept in its own section at the end of the module on purpose: the protocol-2 frames are added above.
# The Python client (rtbroadcast.client.ResumeTracker) decides with judge_event(); the TypeScript
# client's Cursor.judge() implements the same rule, and the server's rtbroadcast.cursor.Cursor applies
# it inline on its hot path (tests/test_resume_tracking.py checks that they agree).
# ==================================================================================================

__all__ += ["EventVerdict", "judge_event"]

#: What a client does with an event: ``apply`` it (the next one), drop it as a ``duplicate`` (already
#: applied, or contained in the snapshot), reconnect on a ``gap`` (a seq was skipped: resuming from the
#: last event applied lets the server replay it), or ``ignore`` it (no position yet, or the event belongs
#: to another stream than the position's: a ``resync_required`` for it is on its way).
EventVerdict: TypeAlias = Literal["apply", "duplicate", "gap", "ignore"]


def judge_event(position: ResumePoint | None, seq: int, *, epoch: str | None = None) -> EventVerdict:
    """Decide what a client that last applied ``position`` does with an event at ``seq``.

    Args:
        position: the last event applied, or the snapshot's position; ``None`` before the first
            ``welcome`` (or ``subscribed``) gave one.
        seq: the event's seq.
        epoch: the epoch of the stream the connection delivers now (the last ``welcome``,
            ``subscribed`` or ``resync_required``); ``None`` when it is the position's.

    Returns:
        The :data:`EventVerdict`: ``ignore`` without a position or for another epoch, ``duplicate`` for
        ``seq <= position.seq``, ``apply`` for ``position.seq + 1``, ``gap`` beyond.
    """
    if position is None or (epoch is not None and epoch != position.epoch):
        return "ignore"
    if seq <= position.seq:
        return "duplicate"
    if seq == position.seq + 1:
        return "apply"
    return "gap"
