"""``python -m bench.cluster``: run a throwaway Redis Cluster on loopback until interrupted.

Starts ``--primaries`` primaries with ``--replicas`` replicas each (``redis-server --cluster-enabled yes``
on free ports, nothing persisted, in a temporary directory), creates the cluster with
``redis-cli --cluster create``, prints its ``redis+cluster://`` URL and waits; Ctrl-C (or SIGTERM) stops
every node and removes the directory. For ``python -m bench --cluster-url ...`` and
``python -m bench.publish_rate redis+cluster://...``. ``--seconds N`` stops by itself after N seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def cluster(primaries: int = 3, replicas: int = 1, cpu: str | None = None) -> Iterator[str]:
    """Run a cluster for the block; yield its URL.

    Args:
        primaries: primaries (shards).
        replicas: replicas per primary.
        cpu: a ``taskset`` CPU list to pin the nodes to (``None``: not pinned).
    """
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise SystemExit("needs redis-server and redis-cli (7+) on PATH")
    workdir = tempfile.TemporaryDirectory(prefix="rtb-bench-cluster-")
    processes: list[subprocess.Popen[bytes]] = []
    ports = [_free_port() for _ in range(primaries * (1 + replicas))]
    try:
        for port in ports:
            directory = Path(workdir.name) / str(port)
            directory.mkdir()
            command = [
                server,
                "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(directory), "--logfile", str(directory / "redis.log"),
                "--cluster-enabled", "yes", "--cluster-port", str(_free_port()),
                "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
                "--repl-diskless-sync-delay", "0",
            ]  # fmt: skip
            if cpu is not None and shutil.which("taskset"):
                command = ["taskset", "-c", cpu, *command]
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 20
        while not all(_answers(p) for p in ports):
            if time.monotonic() > deadline:
                raise SystemExit("the cluster nodes did not start")
            time.sleep(0.05)
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas",
             str(replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            states = [
                subprocess.run([cli, "-p", str(p), "cluster", "info"], capture_output=True, text=True).stdout
                for p in ports
            ]
            if all("cluster_state:ok" in s for s in states):
                break
            if time.monotonic() > deadline:
                raise SystemExit("the cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        workdir.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Run a cluster until interrupted (or ``--seconds``), printing its URL."""
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--primaries", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpu", help="taskset CPU list for the nodes, e.g. 1")
    parser.add_argument("--seconds", type=float, default=3600.0, help="stop after this long (default 1 h)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with cluster(args.primaries, args.replicas, args.cpu) as url:
        print(url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(args.seconds)


if __name__ == "__main__":
    main()
