"""An opt-in uvicorn WebSocket protocol that offers rtbroadcast's endpoint direct writes.

Select it with uvicorn's ``ws`` setting, which takes an import string::

    uvicorn.run(app, ws="rtbroadcast.uvicorn:WebSocketProtocol", ws_max_size=16 * 1024)
    uvicorn app:app --ws rtbroadcast.uvicorn:WebSocketProtocol --ws-max-size 16384

It is uvicorn's own sans-I/O implementation (``ws="websockets-sansio"``, the default since uvicorn 0.50)
with two additions, both offered to the application through ``scope["extensions"]["rtbroadcast.direct"]``
(see :class:`DirectWriter`), which :class:`~rtbroadcast.asgi.BroadcastEndpoint` uses when it finds it:

- **Direct writes.** Server frames are not masked, so one frame's bytes serve every connection: the
  endpoint builds each event's frame once and writes it to every connection's transport, the way
  ``websockets.broadcast()`` does, instead of one ASGI ``send`` (and one frame build) per connection.
- **A close that does not wait.** Closing a slow consumer writes the close frame at once, even while the
  transport is paused by flow control, then ends the connection after a bounded grace (uvicorn's close
  timeout) if the client does not answer it: a client that reads again finds the ``4001`` close frame
  right after the data the server had already handed to its socket.

It also reports the server's frame limit (``ws_max_size``) to the endpoint, which warns once when that
limit is larger than its own ``max_frame_size`` (the server's limit is the one that keeps oversized frames
out of memory).

**Compression.** :class:`WebSocketProtocol` declines permessage-deflate, which browsers always offer: a
broadcast frame is then built once for all connections, where uvicorn's own compression costs a compressor
and its window per connection and one compression per frame per connection. :class:`DeflateWebSocketProtocol`
accepts it (when ``ws_per_message_deflate`` is on, the default) without server context takeover, so that
the endpoint compresses each event once and writes the same compressed frame to every such connection.
Both classes serve every WebSocket route of the server, not only the broadcast ones.

The subclass relies on uvicorn internals that its releases may change, so it checks them: importing this
module with a uvicorn outside :data:`SUPPORTED_UVICORN`, or a protocol object without the attributes it
reads, raises :class:`~rtbroadcast.errors.ConfigurationError` naming the supported versions. Nothing here
is needed for correctness: with ``ws="auto"`` (or another ASGI server) the endpoint sends through ASGI.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.permessage_deflate import PerMessageDeflate, ServerPerMessageDeflateFactory
from websockets.protocol import State
from websockets.server import ServerProtocol

from .errors import ConfigurationError

__all__ = ["SUPPORTED_UVICORN", "DeflateWebSocketProtocol", "DirectWriter", "WebSocketProtocol"]

#: The uvicorn releases this module was written against (lowest included, highest excluded).
SUPPORTED_UVICORN = ((0, 50), (0, 55))
_OPEN = State.OPEN
#: Key of the ASGI scope extension; the value is a :class:`DirectWriter`.
EXTENSION = "rtbroadcast.direct"

#: The uvicorn protocol attributes used here; a release without one of them is refused.
_ATTRIBUTES = (
    "conn",
    "transport",
    "writable",
    "queue",
    "scope",
    "close_sent",
    "disconnected",
    "close_timer",
    "close_timeout",
    "read_paused",
    "config",
)
_METHODS = ("run_asgi", "send", "receive", "handle_close", "connection_lost")


def _supported_versions() -> str:
    (low_major, low_minor), (high_major, high_minor) = SUPPORTED_UVICORN
    return f">={low_major}.{low_minor}, <{high_major}.{high_minor}"


def _unsupported(detail: str) -> ConfigurationError:
    return ConfigurationError(
        f"rtbroadcast.uvicorn supports uvicorn {_supported_versions()} ({detail}); "
        'use ws="auto" (rtbroadcast then sends through ASGI) or a supported uvicorn'
    )


def _check_version(version: str) -> None:
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        raise _unsupported(f"found uvicorn {version}") from None
    low, high = SUPPORTED_UVICORN
    if not low <= found < high:
        raise _unsupported(f"found uvicorn {version}")
    missing = [name for name in _METHODS if not callable(getattr(WebSocketsSansIOProtocol, name, None))]
    if missing:
        raise _unsupported(f"uvicorn {version}'s WebSocketsSansIOProtocol has no {', '.join(missing)}")


_check_version(uvicorn.__version__)


class DirectWriter:
    """What the protocol offers the application in ``scope["extensions"]["rtbroadcast.direct"]``.

    One per connection. Every method is synchronous and safe to call at any time: once the connection is
    closing or closed they do nothing and return false.
    """

    __slots__ = ("_conn", "_protocol", "_transport", "_writable")

    def __init__(self, protocol: DeflateWebSocketProtocol) -> None:
        self._protocol = protocol
        # Fixed for the connection's life; read once, as fan-out calls write() for every connection.
        self._conn = protocol.conn
        self._transport = protocol.transport
        self._writable = protocol.writable

    @property
    def max_message_size(self) -> int | None:
        """The server's limit on an incoming message, in bytes (uvicorn's ``ws_max_size``)."""
        size: int | None = self._protocol.config.ws_max_size
        return size

    @property
    def frames_allowed(self) -> bool:
        """Whether :meth:`write` may be used: no extension, or permessage-deflate that can share frames."""
        extensions = self._conn.extensions
        return not extensions or self.deflate_window_bits is not None

    @property
    def deflate_window_bits(self) -> int | None:
        """The compression window, if the connection negotiated permessage-deflate without server context
        takeover (so one compressed frame serves every such connection); else ``None``."""
        extensions = self._conn.extensions
        if len(extensions) != 1:
            return None
        (extension,) = extensions
        if isinstance(extension, PerMessageDeflate) and extension.local_no_context_takeover:
            bits: int = extension.local_max_window_bits
            return bits
        return None

    def write(self, frame: bytes) -> bool:
        """Write one whole, unmasked frame and return true; or write nothing and return false.

        The frame is plain, or compressed on its own if :attr:`deflate_window_bits` says so.

        False means: the transport is paused by flow control, or the connection is not open (or is
        closing). The caller then sends through ASGI, which waits as the server decides, so that frames
        never overtake each other. Only for connections with :attr:`frames_allowed`.
        """
        protocol = self._protocol
        if (
            self._conn.state is not _OPEN
            or not self._writable.is_set()
            or protocol.close_sent
            or protocol.disconnected
            or self._transport.is_closing()
        ):
            return False
        self._transport.write(frame)
        return True

    def close(self, code: int, reason: str) -> bool:
        """Write a close frame now, even while the transport is paused, and end the connection soon.

        The frame goes right after what the transport already holds (nothing can be taken back from it),
        and the application receives ``websocket.disconnect``. If the client does not answer the close
        within uvicorn's close timeout, the transport is aborted, so a client that never reads again
        costs the server nothing past that grace. Returns false (and does nothing) if the connection is
        not open.
        """
        return self._protocol.rtb_close_now(code, reason)


class DeflateWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, offering :class:`DirectWriter` in the ASGI scope.

    permessage-deflate is accepted when a client offers it and uvicorn's ``ws_per_message_deflate`` is on
    (the default), with uvicorn's parameters plus ``server_no_context_takeover``: each server message is
    compressed on its own, so the endpoint compresses each event once and shares the frame among all
    such connections. Clients still compress with context takeover if they offered to.
    """

    _checked = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._build_conn()
        cls = type(self)
        if not cls._checked:
            missing = [name for name in _ATTRIBUTES if not hasattr(self, name) and name != "scope"]
            if missing:
                raise _unsupported(f"uvicorn {uvicorn.__version__} has no {', '.join(missing)}")
            if not isinstance(self.writable, asyncio.Event) or not isinstance(self.conn, ServerProtocol):
                raise _unsupported(f"uvicorn {uvicorn.__version__} changed its WebSocket protocol")
            cls._checked = True

    def _build_conn(self) -> None:
        # The server-side protocol object uvicorn builds, with the extension offer changed.
        extensions = []
        if self.config.ws_per_message_deflate:
            extensions = [
                ServerPerMessageDeflateFactory(
                    server_no_context_takeover=True,
                    server_max_window_bits=12,
                    client_max_window_bits=12,
                    compress_settings={"memLevel": 5},
                )
            ]
        self.conn = ServerProtocol(
            extensions=extensions,
            max_size=self.config.ws_max_size,
            logger=logging.getLogger("uvicorn.error"),
        )

    async def run_asgi(self) -> None:
        # The scope exists once the handshake request is parsed; the application has not seen it yet.
        scope = cast(dict[str, Any], self.scope)
        extensions = scope.get("extensions")
        if extensions is None:
            extensions = scope["extensions"] = {}
        extensions[EXTENSION] = DirectWriter(self)
        await super().run_asgi()

    def rtb_close_now(self, code: int, reason: str) -> bool:
        """Send a close frame without waiting for flow control; see :meth:`DirectWriter.close`."""
        if self.close_sent or self.disconnected or self.conn.state is not State.OPEN:
            return False
        transport = self.transport
        if transport.is_closing():
            return False
        # What uvicorn's send() does for ``websocket.close``, minus its wait for a writable transport.
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.conn.send_close(code, reason)
        transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:  # read on, to see the client's answer
            self.read_paused = False
            transport.resume_reading()
        # uvicorn closes the transport when the answer comes (handle_close). Without one, abort rather
        # than close: a close would wait for a client that does not read to drain the buffer.
        self.close_timer = self.loop.call_later(self.close_timeout, transport.abort)
        return True


class WebSocketProtocol(DeflateWebSocketProtocol):
    """:class:`DeflateWebSocketProtocol` that declines permessage-deflate: direct writes for every client.

    The recommended choice for broadcast services; see the module docstring for the trade-off.
    """

    def _build_conn(self) -> None:
        self.conn = ServerProtocol(
            extensions=[],
            max_size=self.config.ws_max_size,
            logger=logging.getLogger("uvicorn.error"),
        )
