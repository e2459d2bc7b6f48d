"""What one HTTP request may cost the example service: the request body limit, measured on the real command.

The service runs as ``python -m examples.restaurant_app`` in its own process, so that its memory is measured
alone: ``VmRSS`` of the server process before the oversized requests, ``VmHWM`` (its peak resident set) after.
The client streams each body from one 64 KiB chunk and never holds it whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from examples.restaurant_app.auth import mint_token
from examples.restaurant_app.limits import RequestBodyLimit
from starlette.types import Message, Receive, Scope, Send

from tests.example.conftest import TEST_SECRET
from tests.support import serve

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
RID = "r1"
MIB = 1024 * 1024
CHUNK = b"0," * (32 * 1024)  # 64 KiB of a JSON array's items
CHUNKS = 763
#: The body the issue sent: 50 MB of JSON array, ``[0,0,...,0]``.
HUGE = 1 + CHUNKS * len(CHUNK) + 2


@dataclass
class ServerProcess:
    """The example service in a process of its own."""

    url: str
    pid: int

    def memory_kib(self, field: str) -> int:
        """A ``VmRSS`` / ``VmHWM`` line of the server's ``/proc/<pid>/status``, in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def example_process(tmp_path: Path, **env: str) -> AsyncIterator[ServerProcess]:
    """Run the service's command on SQLite with a token secret; yield once ``/health`` answers."""
    port = _free_port()
    environment = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'limits.db'}",
        "RESTAURANT_TOKEN_SECRET": TEST_SECRET,
        "LOG_LEVEL": "WARNING",
        **env,
    }
    environment.pop("RESTAURANT_ALLOW_LEGACY_UNAUTHENTICATED", None)
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "examples.restaurant_app", "--host", "127.0.0.1", "--port", str(port)),
        cwd=ROOT,
        env=environment,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            for _ in range(200):
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/health")).status_code == 200:
                        break
                assert process.returncode is None, "the service exited"
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the service did not answer within 20 s")
        yield ServerProcess(url, process.pid)
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:  # its event loop is stuck (in a 50 MB body, before the limit existed)
            process.kill()
            await process.wait()


async def huge_json() -> AsyncIterator[bytes]:
    """The ``HUGE`` bytes of a JSON array, produced 64 KiB at a time."""
    yield b"["
    for _ in range(CHUNKS):
        yield CHUNK
    yield b"0]"


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(TEST_SECRET, RID)}", "Content-Type": "application/json"}


async def _health_latencies(url: str, stop: asyncio.Event) -> list[float]:
    """Ask ``/health`` every 20 ms until ``stop``; return how long each answer took."""
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while not stop.is_set():
            started = time.monotonic()
            response = await http.get("/health")
            latencies.append(time.monotonic() - started)
            assert response.status_code == 200, response.text
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)
    return latencies


@pytest.mark.slow
async def test_a_50_mb_body_gets_413_before_it_is_read(tmp_path: Path) -> None:
    """Defect 4 of issue 13: 50 MB to ``POST .../guests`` took 25 s, stalled ``/health`` and peaked at 869 MB.

    Both ways of sending it: with a ``Content-Length`` (refused on the headers) and chunked (refused at the
    first chunk past 1 MiB). Meanwhile ``/health`` on the same process keeps answering.
    """
    async with example_process(tmp_path) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            # Warm up: a normal write, so that the baseline holds what any request needs.
            response = await http.post(
                f"/restaurants/{RID}/guests", json={"guestName": "Ann", "partySize": 2}, headers=_headers()
            )
            assert response.status_code == 201, response.text
        before = server.memory_kib("VmRSS")
        for name, extra in (("Content-Length", {"Content-Length": str(HUGE)}), ("chunked", {})):
            stop = asyncio.Event()
            health = asyncio.ensure_future(_health_latencies(server.url, stop))
            try:
                async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
                    started = time.monotonic()
                    response = await http.post(
                        f"/restaurants/{RID}/guests", content=huge_json(), headers={**_headers(), **extra}
                    )
                    elapsed = time.monotonic() - started
            finally:
                stop.set()
                latencies = await health
            assert response.status_code == 413, (name, response.status_code, response.text[:200])
            # The default limit, 1 MiB.
            assert response.json() == {"detail": f"Request body larger than {MIB} bytes"}
            assert elapsed < 5, (name, elapsed)
            assert latencies, name
            assert max(latencies) < 1, (name, max(latencies))
        peak = server.memory_kib("VmHWM")
    # The server's peak resident set grew by far less than one body (50 MB): it never held one.
    assert (peak - before) * 1024 < 20 * MIB, (before, peak)


async def _swallowing_app(scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app that reads its body, catches whatever reading raises, and answers 400 (or 200)."""
    if scope["type"] == "lifespan":
        assert (await receive())["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.complete"})
        assert (await receive())["type"] == "lifespan.shutdown"
        await send({"type": "lifespan.shutdown.complete"})
        return
    status = 200
    try:
        more = True
        while more:
            message: Message = await receive()
            more = message.get("more_body", False)
    except Exception:  # as FastAPI does with a body it cannot read: "There was an error parsing the body"
        status = 400
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"read"})


async def test_the_limit_holds_even_when_the_application_swallows_it() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * 600

    async with (
        serve(RequestBodyLimit(_swallowing_app, max_body_size=1000)) as address,
        httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as http,
    ):
        assert (await http.post("/", content=b"x" * 1000)).status_code == 200
        # Chunked: the application caught the error and answered 400; the middleware answers 413 instead.
        response = await http.post("/", content=chunks())
        assert response.status_code == 413, response.text
        assert response.json() == {"detail": "Request body larger than 1000 bytes"}
        # Declared: refused before the application runs.
        response = await http.post("/", content=b"x" * 1001)
        assert response.status_code == 413, response.text
