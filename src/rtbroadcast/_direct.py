"""Writing WebSocket frames straight to the server's transport, where the ASGI server allows it.

An ASGI ``websocket.send`` costs several coroutine layers per frame (the framework's wrappers, the
server's ``send``, its sans-I/O protocol building the frame), and fan-out pays that once per connection.
websockets' own ``broadcast()`` skips all of it and writes to each transport; so can we, where the
server is one whose connection object we can recognise and check:

- uvicorn's default WebSocket implementation (``ws="auto"`` or ``"websockets-sansio"``),
- with no WebSocket extension negotiated (a client that negotiated permessage-deflate needs its frames
  compressed with its own per-connection context, which only the server's protocol object can do).

Anything else (Hypercorn, Daphne, uvicorn's ``websockets`` or ``wsproto`` implementations, compression)
keeps the plain ASGI path. A :class:`DirectWriter` never writes unless the connection is open and its
transport is not paused by flow control, so frames written directly and frames sent through ASGI never
interleave out of order: the caller uses one or the other, in queue order.

Server frames are not masked, so one frame's bytes serve every connection: :func:`text_frame` is
computed once per envelope and handed to every transport.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

__all__ = ["DirectWriter", "find_direct_writer", "text_frame"]

_UVICORN_SANSIO = "uvicorn.protocols.websockets.websockets_sansio_impl"
#: The protocol attributes a DirectWriter reads; a uvicorn release without one of them keeps ASGI.
_READ = ("conn", "transport", "writable", "close_sent", "disconnected")


def text_frame(payload: bytes) -> bytes:
    """Return the bytes of one unmasked, unfragmented WebSocket text frame (RFC 6455, section 5.2)."""
    length = len(payload)
    if length < 126:
        header = bytes((0x81, length))
    elif length < 65536:
        header = bytes((0x81, 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + length.to_bytes(8, "big")
    return header + payload


class DirectWriter:
    """Writes whole frames to one uvicorn WebSocket connection's transport while that is safe."""

    __slots__ = ("_conn", "_open", "_protocol", "_transport", "_writable")

    def __init__(self, protocol: Any, open_state: object) -> None:
        self._protocol = protocol
        self._conn = protocol.conn
        self._transport: asyncio.WriteTransport = protocol.transport
        self._writable: asyncio.Event = protocol.writable
        self._open = open_state

    def write(self, frame: bytes) -> bool:
        """Write ``frame`` and return true, or return false (and write nothing) when it must wait.

        False means: the transport is paused by flow control, or the connection is closing or closed.
        The caller then sends through ASGI, which waits for the transport or raises as the server
        decides.
        """
        protocol = self._protocol
        if (
            self._conn.state is not self._open
            or not self._writable.is_set()
            or protocol.close_sent
            or protocol.disconnected
            or self._transport.is_closing()
        ):
            return False
        self._transport.write(frame)
        return True


def find_direct_writer(scope: MutableMapping[str, Any], send: Callable[..., Any]) -> DirectWriter | None:
    """Return a :class:`DirectWriter` for the connection of ``scope``, or ``None`` to keep using ASGI.

    Call it after the handshake (``websocket.accept``). It recognises uvicorn's sans-I/O WebSocket
    protocol, either as the owner of ``send`` or as the ``self`` of the task serving the connection
    (frameworks wrap ``send``), and only if that protocol serves this very ``scope`` object.
    """
    module = sys.modules.get(_UVICORN_SANSIO)
    if module is None:
        return None
    protocol_class = getattr(module, "WebSocketsSansIOProtocol", None)
    if protocol_class is None:
        return None
    protocol = getattr(send, "__self__", None)
    if not isinstance(protocol, protocol_class):
        protocol = _task_owner(protocol_class)
    if protocol is None or getattr(protocol, "scope", None) is not scope:
        return None
    if not all(hasattr(protocol, name) for name in _READ):
        return None
    try:
        from websockets.protocol import State
    except ImportError:
        return None
    conn = protocol.conn
    if getattr(conn, "extensions", True) or getattr(conn, "state", None) is not State.OPEN:
        return None
    if not isinstance(protocol.writable, asyncio.Event):
        return None
    return DirectWriter(protocol, State.OPEN)


def _task_owner(protocol_class: type) -> Any:
    """Return the protocol whose ``run_asgi()`` coroutine drives the current task, if it is one."""
    task = asyncio.current_task()
    if task is None:
        return None
    frame = getattr(task.get_coro(), "cr_frame", None)
    if frame is None or frame.f_code.co_name != "run_asgi":
        return None
    owner = frame.f_locals.get("self")
    return owner if isinstance(owner, protocol_class) else None
