"""The WebSocket session writer: one connection's frames, in order, synchronously whenever possible.

Fan-out hands each frame to :meth:`WebSocketSession.send_now`. Most of the time the frame is written right
there, with no task switch:

- through a :class:`DirectTransport`, when the ASGI server offers one in
  ``scope["extensions"]["rtbroadcast.direct"]`` (:mod:`rtbroadcast.uvicorn` does): the frame's bytes are
  built once per event and written to every connection's transport;
- otherwise through the ASGI ``send``, in a task started eagerly (Python 3.12+), so that a send that
  completes at once also costs no trip through the event loop; on Python 3.11 the task starts on the next
  loop turn.

A send that has to wait (the transport is paused by flow control) is finished by that task, which then
drains what queued up behind it and ends; while it runs, new frames queue behind it, so frames never
overtake each other.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import zlib
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any, Protocol, TypeAlias

from .backends import Envelope
from .connection import Connection, item_text, item_text_v2
from .protocol import CloseCode

__all__ = [
    "EXTENSION",
    "DirectTransport",
    "WebSocketSession",
    "deflated_text_frame",
    "direct_transport",
    "text_frame",
]

logger = logging.getLogger("rtbroadcast.asgi")

Send: TypeAlias = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: The ASGI scope extension through which a server offers a :class:`DirectTransport`.
EXTENSION = "rtbroadcast.direct"
#: How long a close sent through ASGI may wait for a transport that does not drain, in seconds.
CLOSE_GRACE = 10.0


class DirectTransport(Protocol):
    """What an ASGI server offers in ``scope["extensions"]["rtbroadcast.direct"]``.

    :class:`rtbroadcast.uvicorn.DirectWriter` is the implementation; every method is synchronous.
    """

    @property
    def max_message_size(self) -> int | None:
        """The server's own limit on an incoming message, in bytes, if it has one."""

    @property
    def frames_allowed(self) -> bool:
        """Whether :meth:`write` may be used for this connection (no extension, or shareable deflate)."""

    @property
    def deflate_window_bits(self) -> int | None:
        """The window of permessage-deflate without server context takeover; ``None``: plain frames."""

    def write(self, frame: bytes) -> bool:
        """Write a whole unmasked frame now and return true, or write nothing and return false."""

    def close(self, code: int, reason: str) -> bool:
        """Write a close frame now, ahead of flow control; end the connection after a bounded grace."""


def direct_transport(scope: MutableMapping[str, Any]) -> DirectTransport | None:
    """Return the :class:`DirectTransport` the server offers for this connection, if any."""
    extensions = scope.get("extensions") or {}
    direct: DirectTransport | None = extensions.get(EXTENSION)
    return direct


def text_frame(payload: bytes, *, first_byte: int = 0x81) -> bytes:
    """Return the bytes of one unmasked, unfragmented WebSocket text frame (RFC 6455, section 5.2).

    ``first_byte`` is FIN and the opcode (text); 0xC1 also sets RSV1, the mark of a compressed message.
    """
    length = len(payload)
    if length < 126:
        header = bytes((first_byte, length))
    elif length < 65536:
        header = bytes((first_byte, 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((first_byte, 127)) + length.to_bytes(8, "big")
    return header + payload


def deflated_text_frame(payload: bytes, window_bits: int) -> bytes:
    """Return one text frame of ``payload`` compressed on its own (RFC 7692, no context takeover).

    Without context takeover each message is compressed from a fresh state, so the same bytes serve
    every connection that negotiated the same window, as Go's gorilla/websocket ``PreparedMessage``
    does. A payload that compression would not shrink is sent uncompressed (RSV1 clear), which the
    extension allows message by message.
    """
    compressor = zlib.compressobj(wbits=-window_bits, memLevel=5)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    data = data[:-4]  # the sync flush ends with 00 00 ff ff, which the receiver adds back
    if len(data) >= len(payload):
        return text_frame(payload)
    return text_frame(data, first_byte=0xC1)


if sys.version_info >= (3, 12):

    def _start(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        # Runs the coroutine right here up to its first real wait; a send that completes at once has
        # then finished when this returns.
        return asyncio.Task(coroutine, loop=asyncio.get_running_loop(), eager_start=True)

else:

    def _start(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coroutine)


class WebSocketSession:
    """Writes one WebSocket connection's frames and its close frame.

    Args:
        connection: the connection whose queue this session drains.
        send: the ASGI ``send`` callable.
        direct: the server's direct transport for this connection, if it offers one.
        write_frames: whether to write frames through ``direct`` where it allows (the close frame always
            is, where it is offered).
    """

    __slots__ = (
        "abandoned",
        "client_gone",
        "closer",
        "connection",
        "direct",
        "frame_of",
        "owner",
        "send",
        "text_of",
        "write_frame",
        "writer",
    )

    def __init__(
        self,
        connection: Connection,
        send: Send,
        direct: DirectTransport | None = None,
        *,
        write_frames: bool = True,
    ) -> None:
        self.connection = connection
        self.send = send
        #: Closes the connection ahead of flow control (any connection the server offers it for).
        self.direct = direct
        #: Writes one frame directly, if this connection may (no extension, or shareable deflate).
        self.write_frame: Callable[[bytes], bool] | None = None
        v2 = connection.protocol >= 2
        #: The wire text of a queued item in this connection's protocol.
        self.text_of: Callable[[Envelope | str], str] = item_text_v2 if v2 else item_text
        #: Builds (once per event for all connections alike) the frame this connection needs.
        self.frame_of: Callable[[Envelope | str], bytes] = _frame_of_v2 if v2 else _frame_of
        if write_frames and direct is not None and direct.frames_allowed:
            self.write_frame = direct.write
            bits = direct.deflate_window_bits
            if bits is not None:
                deflaters = _DEFLATERS_V2 if v2 else _DEFLATERS
                self.frame_of = deflaters.setdefault(bits, _Deflater(bits, v2=v2))
        self.client_gone = False
        #: The task serving the connection, cancelled if the close frame cannot be sent (``abandoned``).
        self.owner: asyncio.Task[Any] | None = None
        self.abandoned = False
        self.writer: asyncio.Task[None] | None = None
        self.closer: asyncio.Task[None] | None = None
        connection.direct = self.write_frame is not None

    def start(self) -> None:
        """Write what is queued (the welcome, history from the attach) and take frames from fan-out."""
        connection = self.connection
        self.owner = asyncio.current_task()
        connection.add_close_callback(self._on_close)
        connection.set_send_now(self.send_now)
        if connection.queued:
            self._start_writer(None)

    def send_now(self, item: Envelope | str) -> bool:
        """Take ``item`` from fan-out: write it now if the transport allows, else start a writer for it.

        Returns false while a writer is busy, so that the frame queues behind the ones in flight.
        """
        if self.writer is not None:
            return False
        write_frame = self.write_frame
        if write_frame is not None and write_frame(self.frame_of(item)):
            self.connection.sent += 1
            return True
        self._start_writer(item)
        return True

    def _start_writer(self, first: Envelope | str | None) -> None:
        task = _start(self._write(first))
        if not task.done():  # an eager start may have finished it already
            self.writer = task

    async def _write(self, first: Envelope | str | None) -> None:
        """Send ``first`` (if any) and what queues up meanwhile, then end."""
        connection = self.connection
        write_frame = self.write_frame
        frame_of = self.frame_of
        text_of = self.text_of
        try:
            item = first if first is not None else connection.get_nowait()
            while item is not None:
                if write_frame is None or not write_frame(frame_of(item)):
                    await self.send({"type": "websocket.send", "text": text_of(item)})
                connection.sent += 1
                item = connection.get_nowait()
        except asyncio.CancelledError:
            if not connection.closed:
                raise
        except Exception as exc:  # the transport failed: the client is gone
            self._gone(exc)
        finally:
            self.writer = None

    def _gone(self, exc: Exception) -> None:
        logger.debug("websocket send failed on #%d: %r", self.connection.id, exc)
        self.client_gone = True
        self.connection.close(CloseCode.NORMAL, "client gone")

    def _on_close(self, connection: Connection) -> None:
        # A writer may be waiting in send() on a client that stopped reading: cancel it (the server
        # writes nothing of a send it has not started), then send the close frame without it.
        writer = self.writer
        if writer is not None:
            writer.cancel()
        if self.client_gone or connection.close_code == CloseCode.NORMAL:
            return
        code = connection.close_code or CloseCode.NORMAL
        reason = connection.close_reason[:120]
        if self.direct is not None and self.direct.close(code, reason):
            return  # written now, ahead of flow control; the server ends the connection after a grace
        self.closer = _start(self._send_close(writer, code, reason))

    async def _send_close(self, writer: asyncio.Task[None] | None, code: int, reason: str) -> None:
        """Send the close frame through ASGI, after the (cancelled) writer, waiting a bounded time."""
        if writer is not None:
            await asyncio.wait([writer])
        try:
            async with asyncio.timeout(CLOSE_GRACE):
                await self.send({"type": "websocket.close", "code": code, "reason": reason})
        except TimeoutError:
            # The server still waits for the client to read: give up and end the handler; the server
            # then ends the connection without a close frame (the client sees 1006).
            logger.info(
                "close frame (%d) not sent on #%d: the client does not read", code, self.connection.id
            )
            self.abandoned = True
            if self.owner is not None:
                self.owner.cancel()
        except Exception as exc:
            logger.debug("websocket close failed on #%d: %r", self.connection.id, exc)

    async def finish(self) -> None:
        """Wait for the writer (cancelled) and the close frame, once the client has gone."""
        self.owner = None  # no longer reading: nothing to cancel
        writer = self.writer
        if writer is not None:
            writer.cancel()
        pending = [task for task in (writer, self.closer) if task is not None]
        if pending:
            await asyncio.wait(pending)


class _FrameCache:
    """The wire frame of the envelope being fanned out: encoded once, written to every connection."""

    __slots__ = ("envelope", "frame")

    def __init__(self) -> None:
        self.envelope: Envelope | None = None
        self.frame = b""


_frame_cache = _FrameCache()
# Protocol 2's frame of the same envelope differs (it is wrapped): a cache of its own, so that a fan-out
# to protocol-1 and protocol-2 connections alike builds each frame once, not once per switch between them.
_frame_cache_v2 = _FrameCache()


def _frame_of(item: Envelope | str) -> bytes:
    if isinstance(item, str):
        return text_frame(item.encode())
    cache = _frame_cache
    if cache.envelope is not item:
        cache.frame = text_frame(item.data.encode())
        cache.envelope = item
    return cache.frame


def _frame_of_v2(item: Envelope | str) -> bytes:
    if isinstance(item, str):
        return text_frame(item.encode())
    cache = _frame_cache_v2
    if cache.envelope is not item:
        cache.frame = text_frame(item.protocol2_text().encode())
        cache.envelope = item
    return cache.frame


class _Deflater:
    """The compressed frame of the envelope being fanned out, for one window size: built once."""

    __slots__ = ("envelope", "frame", "v2", "window_bits")

    def __init__(self, window_bits: int, *, v2: bool = False) -> None:
        self.window_bits = window_bits
        self.v2 = v2
        self.envelope: Envelope | None = None
        self.frame = b""

    def __call__(self, item: Envelope | str) -> bytes:
        if isinstance(item, str):
            return deflated_text_frame(item.encode(), self.window_bits)
        if self.envelope is not item:
            text = item.protocol2_text() if self.v2 else item.data
            self.frame = deflated_text_frame(text.encode(), self.window_bits)
            self.envelope = item
        return self.frame


_DEFLATERS: dict[int, _Deflater] = {}
_DEFLATERS_V2: dict[int, _Deflater] = {}
