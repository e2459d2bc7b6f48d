"""Shared fixtures: the event loops every async test runs on, Redis; servers are real uvicorn servers.

Event loops
-----------
anyio's pytest plugin runs every ``async def`` test (``anyio_mode = "auto"`` in pyproject.toml) once per
loop: plain asyncio, and uvloop, which uvicorn picks in production whenever it is installed (``loop="auto"``)
and where the direct-write fast path runs. The servers a test starts with ``tests.support.serve`` run in the
test's own loop, so they run on both too; so do the Redis backend's own tests (its listener's sockets and
errors are the loop's). Tests whose module or function carries ``@pytest.mark.asyncio_only`` run on plain
asyncio alone, where a second loop costs time and tests nothing more: in-process logic (the broadcaster,
the backend contract, the outbox relay), tests whose server is a subprocess (which picks uvloop itself),
and the browser tests (the example's transport runs on both loops in tests/example). Synchronous tests that
call ``asyncio.run`` (the hypothesis properties) run on asyncio. ``RTB_TEST_LOOPS=asyncio``
(comma-separated names) runs fewer loops, for a quick local run.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from . import postgres_support
from .redis_support import (
    RedisClusterFixture,
    RedisSentinelFixture,
    RedisServer,
    delete_cluster_keys,
    delete_keys,
    ping,
    throwaway_cluster,
    throwaway_sentinel,
    throwaway_server,
)

# rtbroadcast is asyncio-based (redis-py's asyncio client, asyncio tasks in the adapters): no trio.
_LOOPS: dict[str, Any] = {"asyncio": "asyncio", "uvloop": ("asyncio", {"use_uvloop": True})}
_NO_UVLOOP = importlib.util.find_spec("uvloop") is None  # Windows, or a venv without the dev extra


def _loops(names: list[str]) -> list[Any]:
    selected = [name.strip() for name in os.environ.get("RTB_TEST_LOOPS", ",".join(_LOOPS)).split(",")]
    unknown = set(selected) - set(_LOOPS)
    if unknown:
        raise pytest.UsageError(f"RTB_TEST_LOOPS: unknown loop(s) {sorted(unknown)}; known: {list(_LOOPS)}")
    return [
        pytest.param(
            _LOOPS[name],
            id=name,
            marks=[pytest.mark.skip(reason="uvloop is not installed")]
            if name == "uvloop" and _NO_UVLOOP
            else [],
        )
        for name in names
        if name in selected
    ]


@pytest.fixture(scope="module")
def anyio_backend() -> Any:
    """Replaces anyio's own fixture (every backend anyio knows, trio too); parametrised below."""
    return _LOOPS["asyncio"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # anyio's plugin adds the ``anyio_backend`` fixture to every async test; parametrising it here, rather
    # than with fixture params, lets ``asyncio_only`` choose per test. Module scope keeps hypothesis happy
    # (no function-scoped fixture under @given) and groups a module's tests by loop.
    if "anyio_backend" in metafunc.fixturenames:
        names = ["asyncio"] if metafunc.definition.get_closest_marker("asyncio_only") else list(_LOOPS)
        metafunc.parametrize("anyio_backend", _loops(names), scope="module")


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


# -- PostgreSQL -------------------------------------------------------------------------------------------
#
# ``postgres_url``: the shared server (see tests/postgres_support.py); skipped when it does not answer,
# unless CI=true. ``postgres_schema``: a schema of the test's own, dropped afterwards.


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return postgres_support.postgres_url()


@pytest.fixture
def postgres_schema(postgres_url: str) -> Iterator[str]:
    schema = postgres_support.new_schema()
    yield schema
    postgres_support.run_sync(postgres_support.drop_schema(postgres_url, schema))


# ``redis_cluster``: a Redis Cluster (3 primaries, 3 replicas) shared by the session's cluster tests, which
# keep their keys under their own prefix; tests that kill nodes start their own with ``throwaway_cluster``.


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterFixture]:
    with throwaway_cluster() as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_prefix(redis_cluster: RedisClusterFixture) -> Iterator[str]:
    prefix = f"rtbtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_cluster_keys(redis_cluster, prefix)


# ``redis_sentinel``: a master, a replica and three Sentinels shared by the session's Sentinel tests, which keep
# their keys under their own prefix; tests that kill the master start their own with ``throwaway_sentinel``.


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelFixture]:
    with throwaway_sentinel() as deployment:
        yield deployment


@pytest.fixture
def redis_sentinel_prefix(redis_sentinel: RedisSentinelFixture) -> Iterator[str]:
    prefix = f"rtbtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    master = redis_sentinel.current_master()
    delete_keys(f"redis://127.0.0.1:{master.port}/0", prefix)
