"""Drain the broadcaster's connections when the process is told to stop, before the ASGI server reacts.

uvicorn reacts to SIGTERM/SIGINT by closing its WebSocket connections itself (code ``1012``), then waits
for every HTTP response in flight, an endless Server-Sent Events stream included, and only then runs the
lifespan's shutdown. Nothing in ASGI tells an application that the server is stopping before that. So
:func:`drain_on_signals` chains the handler the server installed with :func:`signal.signal`: on the first
signal it drains the broadcaster (clients get ``1001`` and SSE streams end), then passes the signal on to
the server's handler, which shuts down as it always does, now with nothing left open. A second signal
is passed on at once (uvicorn: a second Ctrl+C forces the exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from .broadcaster import Broadcaster

__all__ = ["drain_on_signals"]

logger = logging.getLogger("rtbroadcast")

#: The signals servers stop on (uvicorn, hypercorn, gunicorn workers).
SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)

_Handler = Callable[[int, FrameType | None], Any]


@contextlib.contextmanager
def drain_on_signals(
    broadcaster: Broadcaster, *, timeout: float = 2.0, signals: tuple[signal.Signals, ...] = SIGNALS
) -> Iterator[None]:
    """While inside, drain ``broadcaster`` on the first stop signal before the server's own handler runs.

    Only signals whose handler is a Python function the server installed with :func:`signal.signal`
    (uvicorn does, in the main thread) are chained; outside the main thread, or where no server installed
    a handler (the default action, Python's ``KeyboardInterrupt``), nothing is installed. A server that
    uses :meth:`asyncio.loop.add_signal_handler` instead (hypercorn) hears of the signal at once, from
    the event loop: the drain then runs alongside its own shutdown. Leaving restores each handler that is
    still this one.

    Args:
        broadcaster: drained with :meth:`Broadcaster.drain`.
        timeout: passed to :meth:`Broadcaster.drain`; the server's handler runs after it at the latest.
        signals: the signals to chain.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous: dict[int, _Handler] = {}
    received: list[tuple[int, FrameType | None]] = []
    signalled = False
    draining: asyncio.Task[None] | None = None

    def pass_on() -> None:
        while received:
            signum, frame = received.pop(0)
            previous[signum](signum, frame)

    async def drain_then_pass_on() -> None:
        try:
            await broadcaster.drain(timeout)
        except Exception:
            logger.exception("draining the broadcaster failed")
        finally:
            pass_on()

    def start_draining() -> None:
        nonlocal draining
        draining = loop.create_task(drain_then_pass_on())

    def handle(signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes, maybe inside the event loop: only hand over.
        nonlocal signalled
        received.append((signum, frame))
        if signalled or loop.is_closed():
            pass_on()  # a second signal: no more waiting
            return
        signalled = True
        loop.call_soon_threadsafe(start_draining)

    for signum in signals:
        current = signal.getsignal(signum)
        # A Python function a server installed; not the default action, nor Python's KeyboardInterrupt.
        if callable(current) and current is not signal.default_int_handler:
            previous[signum] = current
            signal.signal(signum, handle)
    try:
        yield
    finally:
        for number, handler in previous.items():
            if signal.getsignal(number) == handle:
                signal.signal(number, handler)
        if draining is not None and not draining.done():
            draining.cancel()
