"""Helpers for testing a service that broadcasts: run the app on a real server, follow it with the client.

::

    from rtbroadcast.testing import serve

    async def test_a_post_reaches_the_room() -> None:
        async with serve(app) as server, server.client("/realtime?room=lobby") as client:
            subscription = client.subscribe(model=MessagePosted)
            await subscription.connected()
            async with server.http() as http:
                await http.post("/rooms/lobby/messages", json={"text": "hi"})
            [received] = await subscription.take(1)

:func:`serve` runs an ASGI app with uvicorn on a free loopback port in the test's own event loop, its
lifespan included, so that the test talks to it over real sockets, as a device would. For a server that
already runs elsewhere (a staging deployment), make a :class:`~rtbroadcast.client.Client` with its
address: the client's :meth:`~rtbroadcast.client.Subscription.connected` and
:meth:`~rtbroadcast.client.Subscription.take` are made for tests.

Needs ``pip install 'rtbroadcast[testing]'`` (uvicorn, websockets, httpx); importing this module does not
import them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    import httpx

    from .client import Client

__all__ = ["LiveServer", "serve"]


@dataclass(frozen=True, slots=True)
class LiveServer:
    """A running server: where it listens, and clients for it.

    ``host`` is ``"127.0.0.1:PORT"``.
    """

    host: str

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT``."""
        return f"http://{self.host}"

    def ws_url(self, path: str) -> str:
        """The ``ws://`` address of ``path`` (query included: ``"/realtime?room=lobby"``)."""
        return f"ws://{self.host}/{path.lstrip('/')}"

    def client(self, path: str, **options: Any) -> Client:
        """A :class:`~rtbroadcast.client.Client` of the stream at ``path``; ``options`` go to it.

        Use it as an async context manager, so that it closes with the test.
        """
        from .client import Client

        return Client(self.ws_url(path), **options)

    def http(self, **options: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` with this server as its base URL (close it, or use ``async with``)."""
        import httpx

        return httpx.AsyncClient(base_url=self.base_url, **options)


@contextlib.asynccontextmanager
async def serve(
    app: Any, *, port: int = 0, startup_timeout: float = 10.0, **options: Any
) -> AsyncIterator[LiveServer]:
    """Run ``app`` with uvicorn on ``127.0.0.1`` in the current event loop until the block ends.

    The app's lifespan runs (``lifespan="on"``), so its broadcaster connects and, at the end, drains
    its connections as in production.

    Args:
        app: an ASGI application (Starlette, FastAPI, ...).
        port: the port; 0 (the default) picks a free one. A fixed port lets a test stop the server and
            start another one where clients reconnect.
        startup_timeout: seconds the server may take to start.
        options: more ``uvicorn.Config`` options (``ws=``, ``log_level=``, ...).

    Raises:
        ConfigurationError: ``uvicorn`` is not installed.
        RuntimeError: the server stopped, or did not start, within ``startup_timeout``.
    """
    try:
        import uvicorn
    except ImportError:
        raise ConfigurationError(
            "rtbroadcast.testing.serve needs uvicorn: pip install 'rtbroadcast[testing]'"
        ) from None

    class Server(uvicorn.Server):
        """uvicorn's server, kept off the test runner's signals: Ctrl-C stays pytest's."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config: dict[str, Any] = {"log_level": "warning", "lifespan": "on", **options}
    server = Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))

    async def run() -> None:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn's answer to a failed lifespan startup: not the test's exit
            raise RuntimeError(f"uvicorn exited with status {exc.code}") from None

    task = asyncio.get_running_loop().create_task(run(), name="rtbroadcast-testing-serve")
    deadline = time.monotonic() + startup_timeout
    try:
        # uvicorn sets a flag, not an event, once it listens (after the lifespan's startup).
        while not server.started:
            if task.done() or time.monotonic() > deadline:
                server.should_exit = True
                try:
                    await task
                except Exception as exc:
                    raise RuntimeError(f"uvicorn stopped before it started (see its log): {exc}") from exc
                raise RuntimeError(f"uvicorn did not start within {startup_timeout} s")
            await asyncio.sleep(0.01)
    except BaseException:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise
    try:
        bound = server.servers[0].sockets[0].getsockname()[1]
        yield LiveServer(f"127.0.0.1:{bound}")
    finally:
        server.should_exit = True
        await task
