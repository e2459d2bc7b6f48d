"""Real PostgreSQL servers for tests: the shared one (a schema of each test's own), or a throwaway cluster.

The shared server is ``RTB_TEST_POSTGRES_URL``, else ``127.0.0.1:5432/test`` as ``postgres`` or ``root``
(trust auth). Tests never touch what they did not create: each uses a schema named ``rtbtest_<random>``
and drops it afterwards. A test that must stop or restart PostgreSQL starts a cluster of its own
(:class:`ThrowawayPostgres`: ``initdb`` and ``pg_ctl`` in a temporary directory, on a free loopback port).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from .support import free_port

CANDIDATES = (
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
)

T = TypeVar("T")

_probe: dict[str, str | None] = {}


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to the end on a loop of its own, in a thread: callable where a loop runs already."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _accepts(url: str) -> str | None:
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except Exception as exc:  # whatever the driver raises, this candidate is not usable
        return f"{url}: {type(exc).__name__}: {exc}"
    await conn.close()
    return None


def postgres_url() -> str:
    """Return the shared server's URL (probed once per session); skip, or fail on CI, if none answers."""
    if "url" not in _probe:
        configured = os.environ.get("RTB_TEST_POSTGRES_URL")
        candidates = (configured.replace("+asyncpg", ""),) if configured else CANDIDATES
        errors = []
        for url in candidates:
            error = run_sync(_accepts(url))
            if error is None:
                _probe.update(url=url, error=None)
                break
            errors.append(error)
        else:
            _probe.update(url=None, error="; ".join(errors))
    url = _probe["url"]
    if url is None:
        message = f"PostgreSQL is not reachable ({_probe['error']})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI=true requires it", pytrace=False)
        pytest.skip(message)
    return url


def new_schema() -> str:
    """Return a schema name no other test uses."""
    return f"rtbtest_{uuid.uuid4().hex[:12]}"


async def drop_schema(url: str, schema: str) -> None:
    """Drop ``schema`` and everything in it, if it exists (run it with :func:`run_sync`)."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def postgres_binaries() -> Path | None:
    """Return the directory of ``initdb`` and ``pg_ctl``: on PATH, else the newest /usr/lib/postgresql."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


class ThrowawayPostgres:
    """A PostgreSQL cluster of the test's own, on a fixed loopback port so that it can be restarted.

    Running as root (containers), ``initdb`` and ``postgres`` refuse to start; the cluster then runs as
    the ``postgres`` system user (``runuser``), which owns its temporary directory.
    """

    def __init__(self, binaries: Path, settings: dict[str, str] | None = None) -> None:
        self.binaries = binaries
        self.settings = dict(settings or {})
        self.port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="rtb-pg-")
        self.dir = Path(self._tmp.name)
        self.data = self.dir / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise RuntimeError("running as root without runuser: cannot start a PostgreSQL cluster")
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres")

    @property
    def url(self) -> str:
        """The URL of the cluster's ``postgres`` database, as superuser ``postgres`` (trust auth)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str, timeout: float = 60) -> None:
        subprocess.run([*self._as, *command], check=True, capture_output=True, timeout=timeout, cwd=self.dir)

    def init(self) -> None:
        """Create the cluster (trust auth, loopback only, no fsync: nothing here needs to survive a crash)."""
        self._run(
            str(self.binaries / "initdb"), "-D", str(self.data), "-U", "postgres",
            "--auth=trust", "--no-sync", "-E", "UTF8",
        )  # fmt: skip

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off"
        options += "".join(f" -c {key}={value}" for key, value in self.settings.items())
        self._run(
            str(self.binaries / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.dir / "log"), "-w", "-t", "30", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients; ``immediate``: as after a crash)."""
        self._run(str(self.binaries / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def log(self) -> str:
        """Return the server's log."""
        path = self.dir / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """Stop the server if it runs and delete the cluster."""
        with contextlib.suppress(Exception):
            self.stop("immediate")
        self._tmp.cleanup()


@contextlib.contextmanager
def throwaway_postgres(settings: dict[str, str] | None = None) -> Iterator[ThrowawayPostgres]:
    """Run a throwaway cluster for the duration of the block; skip if PostgreSQL is not installed.

    ``settings`` are server settings (``{"track_commit_timestamp": "on"}``).
    """
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip(
            "initdb is not installed (no PostgreSQL server binaries on PATH or in /usr/lib/postgresql)"
        )
    server = ThrowawayPostgres(binaries, settings)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.close()
