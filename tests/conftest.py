"""Shared fixtures: every test runs on asyncio (anyio's pytest plugin), servers are real uvicorn servers."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    # rtbroadcast is asyncio-based (redis-py's asyncio client, asyncio tasks in the adapters).
    return "asyncio"
