"""The load generator: picows subscribers and keep-alive HTTP publishers in one uvloop process.

Run by :mod:`bench.run` as ``python -m bench.loadgen -`` with the JSON config on stdin (or as the
argument instead of ``-``); it prints progress on stderr and one JSON object (results per target) on
the last line of stdout.

How it measures
---------------
* Several targets (one server process per stack) are driven by one process, one at a time, in
  interleaved rounds: round 1 runs a short trial against every target, round 2 does the same in a
  rotated order, and so on. Noise on a shared machine then hits every stack alike instead of
  whichever happened to run during a bad second.
* Every subscriber parses every text frame. Frames whose ``type`` is not ``bench`` (rtbroadcast's
  ``welcome``, the ``probe`` used to wait for subscriptions, the ``fill`` that backs up slow
  readers) are not counted.
* Publisher connection ``p`` numbers its events ``n = 1, 2, ...`` per channel. Every server handles
  a connection's requests one after the other, so on each (channel, connection) stream a subscriber
  must see ``n`` grow by exactly one. A jump is a loss (until the missing number shows up late: then
  it is a reorder); a number seen twice is a duplicate. rtbroadcast's ``seq`` is checked the same
  way, per channel.
* The publisher keeps, per event, how many normal subscribers still have to receive it. When the
  count reaches zero the event is complete and its publish -> last-device latency is recorded.
* Saturation trial: ``publishers`` connections publish back to back, but at most ``window`` events
  may be incomplete at once, so a server that answers the POST before it fans out cannot queue
  without bound. Deliveries/s = deliveries / (last delivery - first send).
* Latency trial: events go out on a fixed schedule (``rate`` per second over all publishers); the
  send time is read just before the request is written.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import statistics
import sys
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter, perf_counter_ns
from typing import Any, cast

import httptools
import psutil  # type: ignore[import-untyped]
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

loads: Callable[[bytes], Any]
try:
    from orjson import loads
except ImportError:  # pragma: no cover - orjson is in the bench extra
    loads = json.loads

_TEXT = WSMsgType.TEXT
_CLOSE = WSMsgType.CLOSE


@dataclass
class TargetConfig:
    """One server under test."""

    name: str
    ws_url: str
    http_port: int
    channels: list[str]
    server_pid: int = 0
    redis_pid: int = 0


@dataclass
class LoadConfig:
    """What one load-generator run does. Built by :mod:`bench.run` from a scenario."""

    targets: list[TargetConfig]
    subs_per_channel: int
    slow_per_channel: int = 0
    #: Subscribers offer permessage-deflate (as browsers do) and inflate compressed frames.
    deflate: bool = False
    publishers: int = 4
    window: int = 64
    rate: float = 0.0
    rate_seconds: float = 0.0
    sat_seconds: float = 0.0
    rounds: int = 3
    idle_seconds: float = 0.0
    verify: bool = False
    payload_bytes: int = 200
    fill_bytes: int = 8 * 1024 * 1024
    fill_frame_bytes: int = 32 * 1024
    connect_concurrency: int = 100
    connect_timeout: float = 60.0
    trial_drain_timeout: float = 2.0
    drain_timeout: float = 15.0
    slow_read_period: float = 1.0

    def __post_init__(self) -> None:
        self.targets = [t if isinstance(t, TargetConfig) else TargetConfig(**t) for t in self.targets]


class Bucket:
    """Counters of one trial; every published event points at the bucket it counts in."""

    __slots__ = (
        "completed",
        "deliveries",
        "each",
        "first_send",
        "kind",
        "last_delivery",
        "latency",
        "outstanding",
        "sent",
    )

    def __init__(self, kind: str, record_each: bool = False) -> None:
        self.kind = kind
        self.sent = 0
        self.first_send = 0
        self.deliveries = 0
        self.last_delivery = 0
        self.completed = 0
        self.outstanding = 0
        self.latency: list[int] = []
        self.each: list[int] | None = [] if record_each else None


# -- subscribers -----------------------------------------------------------------------------------


class Subscriber(WSListener):
    """One WebSocket subscriber: counts, orders and times every bench frame it receives."""

    def __init__(self, target: Target, channel: int, normal: bool) -> None:
        super().__init__()
        self.target = target
        self.channel = channel
        self.normal = normal
        self.transport: WSTransport | None = None
        self.last = [0] * target.streams
        self.missing: set[tuple[int, int]] = set()
        self.received = 0
        self.duplicated = 0
        self.reordered = 0
        self.seq_last = -1
        self.seq_gaps = 0
        self.seq_backwards = 0
        self.ready = False
        self.disconnected = False
        self.close_code: int | None = None
        #: Inflates compressed frames once the server accepted permessage-deflate (context takeover).
        self.inflater: Any = None

    def accept_upgrade(self, _request: Any, response: Any) -> Subscriber:
        """picows' listener factory: note whether the server accepted the compression we offered."""
        extensions = ",".join(
            v for k, v in response.headers.items() if k.lower() == "sec-websocket-extensions"
        )
        if "permessage-deflate" in extensions:
            self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            self.target.deflate_accepted += 1
        return self

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not _TEXT:
            if frame.msg_type is _CLOSE:
                self.close_code = frame.get_close_code().value
                transport.send_close(frame.get_close_code())
                transport.disconnect()
            return
        now = perf_counter_ns()
        if frame.rsv1 and self.inflater is not None:
            m = loads(self.inflater.decompress(frame.get_payload_as_bytes() + b"\x00\x00\xff\xff"))
        else:
            m = loads(frame.get_payload_as_bytes())
        kind = m.get("type")
        seq = m.get("seq")
        if seq is not None and kind != "welcome":
            last_seq = self.seq_last
            if last_seq >= 0 and seq != last_seq + 1:
                if seq > last_seq:
                    self.seq_gaps += seq - last_seq - 1
                else:
                    self.seq_backwards += 1
            if seq > last_seq:
                self.seq_last = seq
        if kind == "bench":
            p = m["p"]
            n = m["n"]
            last = self.last
            prev = last[p]
            if n != prev + 1:
                if n > prev:
                    self.missing.update((p, k) for k in range(prev + 1, n))
                    last[p] = n
                elif (p, n) in self.missing:
                    self.missing.discard((p, n))
                    self.reordered += 1
                else:
                    self.duplicated += 1
                    return
            else:
                last[p] = n
            self.received += 1
            if self.normal:
                target = self.target
                msg_id = m["id"]
                rec = target.pending.get(msg_id)
                if rec is not None:
                    bucket = rec[2]
                    bucket.deliveries += 1
                    bucket.last_delivery = now
                    if bucket.each is not None:
                        bucket.each.append(now - rec[1])
                    rec[0] -= 1
                    if rec[0] == 0:
                        target.complete(msg_id, rec, now)
        elif kind == "fill":
            if self.normal:
                self.target.fill_received += 1
        elif kind == "probe":
            self.ready = True
        elif kind == "welcome" and seq is not None:
            self.seq_last = seq

    # -- slow reader ----------------------------------------------------------------------------

    def pause(self) -> None:
        if self.transport is not None and not self.disconnected:
            self.transport.underlying_transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.disconnected:
            self.transport.underlying_transport.resume_reading()

    def caught_up(self) -> bool:
        """Whether this subscriber has every bench event published on its channel (or is gone)."""
        target = self.target
        published = sum(target.next_n[p][self.channel] for p in range(target.streams))
        return self.disconnected or self.received >= published

    def catch_up(self) -> None:
        """Read at full speed again, with a normal receive buffer."""
        if self.transport is not None and not self.disconnected:
            sock = self.transport.underlying_transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.resume()


#: What Chrome and Firefox offer in their handshake.
DEFLATE_OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}


def small_buffer_socket(_url: Any) -> socket.socket:
    """Socket of a slow reader: a 4 KiB receive buffer, set before connecting (small window)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


# -- publishers ------------------------------------------------------------------------------------


class HttpConnection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 client connection; requests may be pipelined, answers come in order."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[int]] = deque()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(-1)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        fut = self.waiting.popleft()
        if not fut.done():
            fut.set_result(self.parser.get_status_code())

    async def post(self, head: bytes, body: bytes) -> int:
        """Send one request (``head`` ends with ``Content-Length: ``) and return the status code."""
        if self.lost or self.transport is None:
            return -1
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self.transport.write(b"%s%d\r\n\r\n%s" % (head, len(body), body))
        return await fut


# -- one target ------------------------------------------------------------------------------------


class Target:
    """A server under test: its subscribers, publisher connections, in-flight events and figures."""

    def __init__(self, config: TargetConfig, load: LoadConfig) -> None:
        self.config = config
        self.load = load
        self.name = config.name
        self.streams = load.publishers
        n_channels = len(config.channels)
        self.next_n = [[0] * n_channels for _ in range(self.streams)]
        self.heads = [
            b"POST /publish/%s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: " % name.encode()
            for name in config.channels
        ]
        self.normal_per_channel = [load.subs_per_channel] * n_channels
        self.subscribers: list[Subscriber] = []
        self.http: list[HttpConnection] = []
        self.pending: dict[int, list[Any]] = {}
        self.next_id = 0
        self.window_waiters: deque[asyncio.Future[None]] = deque()
        self.http_errors = 0
        self.http_reconnects = 0
        self.connect_errors = 0
        self.deflate_accepted = 0
        self.fill_received = 0
        self.stalled = False
        self.background: set[asyncio.Task[Any]] = set()
        self.pad = b"x" * max(0, load.payload_bytes - 72)
        self.server = psutil.Process(config.server_pid) if config.server_pid else None
        self.redis = psutil.Process(config.redis_pid) if config.redis_pid else None
        self.rss_peak = 0
        self.rss: dict[str, int] = {}
        self.result: dict[str, Any] = {}
        self.trials: dict[str, list[dict[str, Any]]] = {"rate": [], "saturation": []}
        self.buckets: dict[str, list[Bucket]] = {"rate": [], "saturation": []}

    # -- bookkeeping -----------------------------------------------------------------------------

    def complete(self, msg_id: int, rec: list[Any], now: int) -> None:
        del self.pending[msg_id]
        bucket: Bucket = rec[2]
        bucket.completed += 1
        bucket.outstanding -= 1
        bucket.latency.append(now - rec[1])
        waiters = self.window_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def wake_all(self) -> None:
        while self.window_waiters:
            waiter = self.window_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def memory(self) -> int:
        try:
            return self.server.memory_info().rss if self.server is not None else 0
        except (psutil.Error, OSError):
            return 0

    def cpu(self) -> tuple[float, float]:
        server = redis = 0.0
        try:
            if self.server is not None:
                t = self.server.cpu_times()
                server = t.user + t.system
            if self.redis is not None:
                t = self.redis.cpu_times()
                redis = t.user + t.system
        except (psutil.Error, OSError):
            pass
        return server, redis

    async def publish(self, stream: int, channel: int, bucket: Bucket) -> bool:
        row = self.next_n[stream]
        n = row[channel] + 1
        row[channel] = n
        msg_id = self.next_id
        self.next_id += 1
        subs = self.normal_per_channel[channel]
        t = perf_counter_ns()
        body = b'{"type":"bench","id":%d,"p":%d,"n":%d,"t":%d,"pad":"%s"}' % (
            msg_id,
            stream,
            n,
            t,
            self.pad,
        )
        if subs:
            self.pending[msg_id] = [subs, t, bucket]
            bucket.outstanding += 1
        if not bucket.sent:
            bucket.first_send = t
        bucket.sent += 1
        status = await self.http[stream].post(self.heads[channel], body)
        if status != 200:
            # Not published: take the number back so the stream stays contiguous, and report it.
            self.http_errors += 1
            if row[channel] == n:
                row[channel] = n - 1
            bucket.sent -= 1
            if self.pending.pop(msg_id, None) is not None:
                bucket.outstanding -= 1
            return False
        return True

    async def post_each(self, channels: list[int], body: bytes, deadline: float) -> None:
        """POST ``body`` once to each channel, spread over the publisher connections."""
        k = len(self.http)

        async def share(i: int) -> None:
            for c in channels[i::k]:
                if perf_counter() > deadline:
                    return
                if await self.http[i].post(self.heads[c], body) != 200:
                    self.http_errors += 1

        await asyncio.gather(*(share(i) for i in range(k)))

    # -- connecting ------------------------------------------------------------------------------

    async def ensure_http(self) -> None:
        """Open the publisher connections, replacing any the server closed."""
        loop = asyncio.get_running_loop()
        for i in range(self.load.publishers):
            if i < len(self.http) and not self.http[i].lost:
                continue
            _, proto = await loop.create_connection(HttpConnection, "127.0.0.1", self.config.http_port)
            if i < len(self.http):
                self.http_reconnects += 1
                self.http[i] = proto
            else:
                self.http.append(proto)

    async def connect(self) -> None:
        load = self.load
        self.rss["base"] = self.memory()
        for c in range(len(self.config.channels)):
            for _ in range(load.subs_per_channel):
                self.subscribers.append(Subscriber(self, c, normal=True))
            for _ in range(load.slow_per_channel):
                self.subscribers.append(Subscriber(self, c, normal=False))
        await self.ensure_http()

        sem = asyncio.Semaphore(load.connect_concurrency)
        started = perf_counter()

        async def one(sub: Subscriber) -> None:
            url = f"{self.config.ws_url}?channel={self.config.channels[sub.channel]}"
            async with sem:
                try:
                    await asyncio.wait_for(
                        ws_connect(
                            sub.accept_upgrade if load.deflate else lambda: sub,
                            url,
                            websocket_handshake_timeout=30,
                            read_buffer_init_size=4096,
                            socket_factory=None if sub.normal else small_buffer_socket,
                            extra_headers=DEFLATE_OFFER if load.deflate else None,
                        ),
                        timeout=30,
                    )
                except Exception as exc:
                    self.connect_errors += 1
                    if self.connect_errors <= 3:
                        log(f"{self.name}: connect failed: {exc!r}")

        tasks = [asyncio.ensure_future(one(sub)) for sub in self.subscribers]
        _, not_done = await asyncio.wait(tasks, timeout=load.connect_timeout)
        for task in not_done:
            task.cancel()
            self.connect_errors += 1
        connect_seconds = perf_counter() - started

        # Wait until every subscription is live: probe channels that still have a deaf subscriber
        # (a server may register the subscription only after the handshake).
        deadline = perf_counter() + load.connect_timeout
        rounds = 0
        while perf_counter() < deadline and rounds < 300:
            deaf = sorted({s.channel for s in self.subscribers if not s.ready and not s.disconnected})
            if not deaf:
                break
            await self.post_each(deaf, b'{"type":"probe"}', deadline)
            rounds += 1
            await asyncio.sleep(0.05 if rounds < 20 else 0.2)
        self.result["connect"] = {
            "subscribers": len(self.subscribers),
            "seconds": round(connect_seconds, 3),
            "errors": self.connect_errors,
            "not_ready": sum(1 for s in self.subscribers if not s.ready),
            "probe_rounds": rounds,
            "deflate_accepted": self.deflate_accepted,
        }
        self.rss["connected"] = self.memory()
        log(
            f"{self.name}: {len(self.subscribers) - self.connect_errors} subscribers "
            f"in {connect_seconds:.1f}s"
        )

    async def fill_slow_readers(self) -> None:
        """Back up the slow readers: publish ``fill_bytes`` of large events the others read at once.

        Without this the kernel's socket buffers (megabytes on loopback) would hide a slow reader
        for longer than a trial lasts.
        """
        load = self.load
        frame = b'{"type":"fill","pad":"%s"}' % (b"x" * load.fill_frame_bytes)
        count = max(1, load.fill_bytes // load.fill_frame_bytes)
        channels = [c for c in range(len(self.config.channels)) for _ in range(count)]
        expected = count * sum(1 for s in self.subscribers if s.normal)
        deadline = perf_counter() + 10
        task = asyncio.ensure_future(self.post_each(channels, frame, deadline))
        self.background.add(task)
        await wait_until(lambda: self.fill_received >= expected, deadline - perf_counter())
        self.result["fill"] = {
            "events": count,
            "bytes_per_event": len(frame),
            "delivered_to_normal": self.fill_received,
            "expected": expected,
        }

    # -- trials ----------------------------------------------------------------------------------

    async def rate_trial(self) -> None:
        load = self.load
        k = load.publishers
        total = int(load.rate * load.rate_seconds)
        n_channels = len(self.config.channels)
        bucket = Bucket("rate", record_each=True)
        start = perf_counter() + 0.02
        hard_stop = start + load.rate_seconds * 1.5 + 1

        async def publisher(i: int) -> None:
            for index in range(i, total, k):
                delay = start + index / load.rate - perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if perf_counter() > hard_stop:
                    return
                if not await self.publish(i, index % n_channels, bucket):
                    return

        await self.trial("rate", bucket, [publisher(i) for i in range(k)], hard_stop - start)

    async def saturation_trial(self) -> None:
        load = self.load
        k = load.publishers
        n_channels = len(self.config.channels)
        bucket = Bucket("saturation")
        deadline = perf_counter() + load.sat_seconds
        timer = asyncio.get_running_loop().call_later(load.sat_seconds, self.wake_all)
        m = min(k, n_channels)

        async def publisher(i: int) -> None:
            mine = [c for c in range(n_channels) if c % m == i % m]
            count = 0
            while perf_counter() < deadline:
                while bucket.outstanding >= load.window:
                    if perf_counter() >= deadline:
                        return
                    waiter = asyncio.get_running_loop().create_future()
                    self.window_waiters.append(waiter)
                    await waiter
                if perf_counter() >= deadline:
                    return
                if not await self.publish(i, mine[count % len(mine)], bucket):
                    return
                count += 1

        try:
            await self.trial("saturation", bucket, [publisher(i) for i in range(k)], load.sat_seconds)
        finally:
            timer.cancel()

    async def verify(self) -> None:
        """Publish one event to every channel and wait for it (after the idle hold)."""
        k = len(self.http)
        n_channels = len(self.config.channels)
        bucket = Bucket("verify")

        async def publisher(i: int) -> None:
            for c in range(i, n_channels, k):
                if not await self.publish(i, c, bucket):
                    return

        await self.ensure_http()
        started = perf_counter()
        await asyncio.wait_for(asyncio.gather(*(publisher(i) for i in range(k))), 30)
        drained = await drain([bucket], self.load.drain_timeout)
        self.result["verify"] = {
            "events": bucket.sent,
            "deliveries": bucket.deliveries,
            "drained": drained,
            "seconds": round(perf_counter() - started, 3),
        }

    async def trial(
        self, kind: str, bucket: Bucket, publishers: list[Awaitable[None]], length: float
    ) -> None:
        load = self.load
        await self.ensure_http()
        cpu0, redis0 = self.cpu()
        cores0 = core_times()
        own0 = time.process_time()
        wall0 = perf_counter()
        tasks = [asyncio.ensure_future(p) for p in publishers]
        # Publishers stop by themselves at their deadline. One stuck behind a stalled server is left
        # running (its answer is counted when it comes); the target then skips its later trials.
        _, stuck = await asyncio.wait(tasks, timeout=length + load.trial_drain_timeout)
        drained = await drain([bucket], load.trial_drain_timeout)
        wall = perf_counter() - wall0
        cpu1, redis1 = self.cpu()
        cores1 = core_times()
        own1 = time.process_time()
        if stuck:
            self.stalled = True
            self.background.update(stuck)
        trial: dict[str, Any] = {
            "sent": bucket.sent,
            "completed": bucket.completed,
            "deliveries": bucket.deliveries,
            "drained": drained,
            "stalled_publishers": len(stuck),
            "server_cpu": round(100 * (cpu1 - cpu0) / wall, 1),
            "loadgen_cpu": round(100 * (own1 - own0) / wall, 1),
            "core_busy": core_busy(cores0, cores1),
        }
        if self.redis is not None:
            trial["redis_cpu"] = round(100 * (redis1 - redis0) / wall, 1)
        if bucket.deliveries:
            seconds = (bucket.last_delivery - bucket.first_send) / 1e9
            trial["seconds"] = round(seconds, 3)
            trial["deliveries_per_s"] = round(bucket.deliveries / seconds, 1)
            trial["events_per_s"] = round(bucket.completed / seconds, 1)
        else:
            trial["deliveries_per_s"] = 0.0
        self.trials[kind].append(trial)
        self.buckets[kind].append(bucket)

    def summarize(self) -> None:
        for kind in ("rate", "saturation"):
            trials = self.trials[kind]
            if not trials:
                continue
            buckets = self.buckets[kind]
            rates = [t["deliveries_per_s"] for t in trials]
            summary: dict[str, Any] = {
                "trials": trials,
                "deliveries_per_s": round(statistics.median(rates), 1),
                "deliveries_per_s_min": min(rates),
                "deliveries_per_s_max": max(rates),
                "server_cpu": statistics.median(t["server_cpu"] for t in trials),
                "loadgen_cpu": statistics.median(t["loadgen_cpu"] for t in trials),
                "core_busy": {
                    core: statistics.median(t["core_busy"].get(core, 0.0) for t in trials)
                    for core in trials[0]["core_busy"]
                },
                "last_device_ms": percentiles([x for b in buckets for x in b.latency]),
                "stalled": self.stalled,
            }
            if kind == "rate":
                summary["target_rate"] = self.load.rate
                sent = sum(t["sent"] for t in trials)
                summary["achieved_rate"] = round(sent / (self.load.rate_seconds * len(trials)), 1)
                summary["each_device_ms"] = percentiles([x for b in buckets for x in (b.each or ())])
            self.result[kind] = summary

    def integrity(self) -> dict[str, Any]:
        """Compare what every subscriber received with what was published on its channel."""
        normal: dict[str, int] = dict.fromkeys(
            ("lost", "duplicated", "reordered", "seq_gaps", "seq_backwards", "disconnected"), 0
        )
        slow: dict[str, Any] = {"subscribers": 0, "received": 0, "expected": 0, "close_codes": {}}
        for s in self.subscribers:
            published = [self.next_n[p][s.channel] for p in range(self.streams)]
            lost = sum(published[p] - s.last[p] for p in range(self.streams)) + len(s.missing)
            if s.normal:
                normal["lost"] += lost
                normal["duplicated"] += s.duplicated
                normal["reordered"] += s.reordered
                normal["seq_gaps"] += s.seq_gaps
                normal["seq_backwards"] += s.seq_backwards
                normal["disconnected"] += s.disconnected
            else:
                slow["subscribers"] += 1
                slow["received"] += s.received
                slow["expected"] += sum(published)
                if s.close_code is not None or s.disconnected:
                    code = str(s.close_code)
                    slow["close_codes"][code] = slow["close_codes"].get(code, 0) + 1
        normal["http_errors"] = self.http_errors
        result_reconnects = self.http_reconnects
        normal["connect_errors"] = self.connect_errors
        normal["incomplete"] = len(self.pending)
        result: dict[str, Any] = {"normal": normal, "http_reconnects": result_reconnects}
        if slow["subscribers"]:
            result["slow"] = slow
        return result

    def finish(self) -> dict[str, Any]:
        self.summarize()
        self.result["integrity"] = self.integrity()
        self.rss["peak"] = max(self.rss_peak, self.memory())
        self.result["rss"] = self.rss
        connected = len(self.subscribers) - self.connect_errors
        grown = self.rss.get("idle", self.rss.get("connected", 0)) - self.rss.get("base", 0)
        self.result["kib_per_connection"] = round(grown / 1024 / connected, 2) if connected else None
        return self.result

    def close(self) -> None:
        for s in self.subscribers:
            if s.transport is not None and not s.disconnected:
                s.transport.disconnect(graceful=False)
        for conn in self.http:
            if conn.transport is not None:
                conn.transport.close()
        for task in self.background:
            task.cancel()


async def wait_until(predicate: Callable[[], bool], seconds: float, step: float = 0.01) -> bool:
    """Poll ``predicate`` every ``step`` for at most ``seconds`` (bounded in count and in time)."""
    deadline = perf_counter() + seconds
    for _ in range(int(seconds / step) + 1):
        if predicate() or perf_counter() >= deadline:
            break
        await asyncio.sleep(step)
    return predicate()


async def drain(buckets: list[Bucket], seconds: float) -> bool:
    """Wait until every event of ``buckets`` has reached every normal subscriber."""
    return await wait_until(lambda: not any(b.outstanding for b in buckets), seconds, 0.005)


# -- the driver ------------------------------------------------------------------------------------


class Driver:
    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.targets = [Target(t, config) for t in config.targets]
        self.stop = False
        self.stop_slow = False

    async def monitor(self) -> None:
        """Sample every server's RSS every 100 ms for its peak (ends with the run)."""
        while not self.stop:
            for t in self.targets:
                t.rss_peak = max(t.rss_peak, t.memory())
            await asyncio.sleep(0.1)

    async def slow_reading(self, slow: list[Subscriber]) -> None:
        """Slow readers read one small receive buffer per period until :attr:`stop_slow`."""
        for s in slow:
            s.pause()
        while not self.stop_slow:
            await asyncio.sleep(self.config.slow_read_period)
            for s in slow:
                s.resume()
            await asyncio.sleep(0)
            for s in slow:
                s.pause()

    async def run(self) -> dict[str, Any]:
        cfg = self.config
        monitor = asyncio.ensure_future(self.monitor())
        try:
            if cfg.idle_seconds:
                await self.run_idle()
            else:
                await self.run_load()
        finally:
            self.stop = True
            monitor.cancel()
        return {t.name: t.result for t in self.targets}

    async def run_idle(self) -> None:
        """One target at a time: connect, hold, measure, check one event per channel, disconnect."""
        for t in self.targets:
            await t.connect()
            await asyncio.sleep(self.config.idle_seconds)
            t.rss["idle"] = t.memory()
            if self.config.verify:
                await t.verify()
            t.finish()
            t.close()
            t.subscribers.clear()
            await asyncio.sleep(0.5)

    async def run_load(self) -> None:
        cfg = self.config
        for t in self.targets:
            await t.connect()
        slow = [s for t in self.targets for s in t.subscribers if not s.normal]
        self.stop_slow = False
        slow_task = asyncio.ensure_future(self.slow_reading(slow))
        if slow:
            for t in self.targets:
                await t.fill_slow_readers()
        n = len(self.targets)
        kinds = []
        if cfg.rate:
            kinds.append("rate")
        if cfg.sat_seconds:
            kinds.append("saturation")
        for kind in kinds:
            for r in range(cfg.rounds):
                for t in self.targets[r % n :] + self.targets[: r % n]:
                    if t.stalled:
                        continue
                    log(f"{kind} trial {r + 1}/{cfg.rounds}: {t.name}")
                    if kind == "rate":
                        await t.rate_trial()
                    else:
                        await t.saturation_trial()
        for t in self.targets:
            t.rss["after_trials"] = t.memory()
        # Slow readers catch up; then everything published must reach every normal subscriber.
        self.stop_slow = True
        await asyncio.wait([slow_task], timeout=cfg.slow_read_period + 1)
        for s in slow:
            s.catch_up()
        await wait_until(lambda: all(s.caught_up() for s in slow), cfg.drain_timeout, 0.05)
        all_buckets = [b for t in self.targets for bs in t.buckets.values() for b in bs]
        await drain(all_buckets, cfg.drain_timeout)
        background = [task for t in self.targets for task in t.background if not task.done()]
        if background:
            await asyncio.wait(background, timeout=cfg.drain_timeout)
            await drain(all_buckets, cfg.drain_timeout)
        for t in self.targets:
            t.finish()
        for t in self.targets:
            t.close()


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    if not samples_ns:
        return {}
    ordered = sorted(samples_ns)
    last = len(ordered) - 1

    def pick(q: float) -> float:
        return round(ordered[min(last, round(q * last))] / 1e6, 3)

    return {
        "count": len(ordered),
        "p50": pick(0.50),
        "p90": pick(0.90),
        "p99": pick(0.99),
        "max": round(ordered[-1] / 1e6, 3),
    }


def core_times() -> dict[int, tuple[int, int]]:
    """(busy, total) clock ticks of every core from ``/proc/stat``; busy includes softirq time, which
    loopback networking spends outside any process."""
    result: dict[int, tuple[int, int]] = {}
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                if line.startswith("cpu") and line[3].isdigit():
                    name, *values = line.split()
                    ticks = [int(v) for v in values[:8]]
                    idle = ticks[3] + ticks[4]
                    result[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    except OSError:
        pass
    return result


def core_busy(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[str, float]:
    busy = {}
    for core, (b1, t1) in after.items():
        b0, t0 = before.get(core, (0, 0))
        if t1 > t0:
            busy[str(core)] = round(100 * (b1 - b0) / (t1 - t0), 1)
    return busy


def log(message: str) -> None:
    print(f"  [loadgen] {message}", file=sys.stderr, flush=True)


def raise_fd_limit(wanted: int = 65536) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(wanted, hard), max(wanted, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main_async(config: LoadConfig) -> dict[str, Any]:
    return await Driver(config).run()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    text = args[0] if args and args[0] != "-" else sys.stdin.read()
    config = LoadConfig(**json.loads(text))
    raise_fd_limit()
    result = uvloop.run(main_async(config))
    sys.stdout.write(json.dumps({"loadgen_pid": os.getpid(), "targets": result}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
