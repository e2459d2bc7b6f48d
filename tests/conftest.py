"""Shared fixtures: every test runs on asyncio (anyio's pytest plugin), servers are real uvicorn servers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from .redis_support import RedisServer, delete_keys, ping, throwaway_server


@pytest.fixture
def anyio_backend() -> str:
    # rtbroadcast is asyncio-based (redis-py's asyncio client, asyncio tasks in the adapters).
    return "asyncio"


# -- Redis ------------------------------------------------------------------------------------------------
#
# ``redis_url``: the Redis every Redis test shares. RTB_REDIS_URL if set (it must answer), else the machine's
# Redis on 127.0.0.1:6379 if it answers PING, else a throwaway redis-server for the session. Each test keeps
# its keys under its own ``redis_prefix`` and deletes them afterwards; nothing is ever flushed.
# ``redis_server``: a server of the test's own, which the test may kill and restart.


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    configured = os.environ.get("RTB_REDIS_URL")
    if configured:
        parts = urlsplit(configured)
        if parts.scheme == "redis" and not ping(
            parts.hostname or "127.0.0.1", parts.port or 6379, password=parts.password
        ):
            pytest.fail(f"RTB_REDIS_URL={configured} does not answer PING", pytrace=False)
        yield configured
        return
    if ping("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        return
    with throwaway_server() as server:
        yield server.url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"rtbtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_keys(redis_url, prefix)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with throwaway_server() as server:
        yield server
