"""Oversized client frames are refused from their header (1009), before they are buffered.

The ASGI server's frame limit is the one that keeps memory bounded: uvicorn's ``ws_max_size``, which the
example service (and the docs) tie to the endpoint's ``max_frame_size``. Measured on a real server
process: 50 connections each sending a 20 MiB frame must not grow its memory by 50 MB, nor delay the
events of the other clients past 50 ms (p99).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest
import websockets

from rtbroadcast.protocol import DEFAULT_MAX_FRAME_SIZE

from .support import ROOT, server_process

# The server and the attack are processes of their own: one event loop is enough for the test.
pytestmark = pytest.mark.asyncio_only

MiB = 1024 * 1024


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.parametrize("frame_size", [8 * MiB, 20 * MiB])
async def test_50_oversized_frames_cost_no_memory_and_no_latency(frame_size: int) -> None:
    async with server_process(
        "-m", "uvicorn", "tests.ticker_app:app", "--log-level", "warning",
        # What the example service runs with, and the docs recommend.
        "--ws", "rtbroadcast.uvicorn:WebSocketProtocol", "--ws-max-size", str(DEFAULT_MAX_FRAME_SIZE),
    ) as server:  # fmt: skip
        port = int(server.host.rsplit(":", 1)[1])
        pid = server.process.pid
        probe = await websockets.connect(f"ws://{server.host}/ws?room=tick", open_timeout=5)
        watchers = [probe] + [
            await websockets.connect(f"ws://127.0.0.1:{port}/ws?room=tick", compression=None)
            for _ in range(4)
        ]
        late: list[float] = []

        async def watch(ws: websockets.ClientConnection) -> None:
            async for raw in ws:
                message = json.loads(raw)
                if message.get("type") == "tick":
                    late.append(time.time() - message["t"])

        readers = [asyncio.create_task(watch(ws)) for ws in watchers]
        await asyncio.sleep(3)
        # What this machine gives without an attack, to tell the attack's cost from the host's noise.
        quiet = sorted(late)
        rss_before = _status_kib(pid, "VmRSS")
        late.clear()
        attack = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.oversized_attack",
            str(port),
            str(frame_size),
            "50",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        output, _ = await asyncio.wait_for(attack.communicate(), 60)
        codes = json.loads(output)
        await asyncio.sleep(0.5)
        peak = _status_kib(pid, "VmHWM")
        for task in readers:
            task.cancel()
        for ws in watchers:
            await ws.close()
    growth_mb = (peak - rss_before) * 1024 / 1e6
    late.sort()
    p99_ms = late[int(len(late) * 0.99)] * 1000
    quiet_p99_ms = quiet[int(len(quiet) * 0.99)] * 1000
    # The figures, for the record (pytest -s shows them).
    print(  # noqa: T201
        f"frames of {frame_size // MiB} MiB: RSS {rss_before // 1024} MiB -> peak {peak // 1024} MiB, "
        f"+{growth_mb:.1f} MB; {len(late)} events, p99 {p99_ms:.1f} ms (without attack {quiet_p99_ms:.1f} ms); "
        f"close codes {set(codes)}"
    )
    # The server closes right after the header; a client still sending may see the reset before it
    # reads the close frame.
    assert set(codes) <= {1009, None} and codes.count(1009) >= 25
    assert growth_mb < 50
    assert len(late) > 20
    # 50 ms on a quiet machine; on a busy one, the attack may add at most that to what the host costs.
    assert p99_ms < 50 + quiet_p99_ms


def test_the_example_service_runs_uvicorn_with_the_endpoint_s_frame_limit() -> None:
    from examples.restaurant_app.__main__ import uvicorn_options
    from examples.restaurant_app.config import Settings

    options = uvicorn_options(Settings())
    assert options["ws_max_size"] == DEFAULT_MAX_FRAME_SIZE
    assert options["ws"] == "rtbroadcast.uvicorn:WebSocketProtocol"
