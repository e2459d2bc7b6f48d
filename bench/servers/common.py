"""Helpers shared by the Starlette-based servers."""

from __future__ import annotations

from typing import Any

import uvicorn

#: Every Starlette stack runs under the same uvicorn configuration: uvloop, httptools and uvicorn's
#: default WebSocket implementation, one worker, no access log, no WebSocket keepalive pings.
UVICORN_OPTIONS: dict[str, Any] = {
    "loop": "uvloop",
    "http": "httptools",
    "ws": "auto",
    "log_level": "warning",
    "access_log": False,
    "backlog": 16384,
    "lifespan": "on",
    "timeout_graceful_shutdown": 3,
    # The load generator keeps its publisher connections open across trials of other stacks.
    "timeout_keep_alive": 600,
    # No keepalive pings, on every stack: a slow reader would otherwise be closed by uvicorn's ping
    # timeout (1011) before the library under test shows what it does about it.
    "ws_ping_interval": None,
}


def run_uvicorn(app: Any, port: int, **overrides: Any) -> None:
    """Serve ``app`` on 127.0.0.1:``port`` until SIGTERM/SIGINT; ``overrides`` replace options."""
    uvicorn.run(app, host="127.0.0.1", port=port, **{**UVICORN_OPTIONS, **overrides})
