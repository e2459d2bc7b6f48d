"""A hypothesis state machine on one protocol-2 connection: per channel, every event once and in order, or a
``resync_required`` exactly where the resume point cannot be covered; on memory and on Redis.

Each example runs a real uvicorn server (on a loopback port) and one real WebSocket client, in an event
loop of the example's own: rules subscribe (fresh, resuming, or with a position that cannot be resumed),
unsubscribe, publish on several channels, disconnect and reconnect (the resolver's server-side channel then
resumes from the ``resume`` token of its last position). The model checks every frame as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from websockets.asyncio.client import ClientConnection

from rtbroadcast import Backend, Broadcaster, ResumePoint
from rtbroadcast.asgi import ConnectionRequest
from rtbroadcast.backends.memory import MemoryBackend
from rtbroadcast.backends.redis import RedisBackend
from rtbroadcast.protocol import encode_positions

from .redis_support import delete_keys
from .support import MS, broadcast_app, connect, serve

HISTORY = 5
CHANNELS = ("a", "b", "c")
SERVER_SIDE = "srv"
TIMEOUT = 5_000 * MS


@dataclass
class Stream:
    """What the model knows of one channel: its top, and where the client stands in it."""

    top: int = 0
    #: The client's position: from its subscribed frame, the events and resyncs it received since.
    position: ResumePoint | None = None
    subscribed: bool = False
    #: A request for this channel is in flight (its answer not read yet).
    pending: str | None = None


def _server_side(request: ConnectionRequest) -> list[str]:
    return [request.query["prefix"] + SERVER_SIDE]


class OneConnection(RuleBasedStateMachine):
    """Subclassed per backend: ``make_backend()`` returns a fresh backend for each example."""

    exact_trim = True

    def make_backend(self) -> Backend:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Delete what the example left in the backend (Redis keys)."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.prefix = uuid.uuid4().hex[:8] + ":"
        self.stack = contextlib.AsyncExitStack()
        self.broadcaster = Broadcaster(backend=self.make_backend(), position_check_interval=None)
        app = broadcast_app(self.broadcaster, channel=_server_side, max_messages_per_second=10_000)
        self.host = self.run(self.stack.enter_async_context(serve(app)))
        self.streams = {name: Stream() for name in (*CHANNELS, SERVER_SIDE)}
        # Each channel's epoch (Redis gives every stream its own).
        self.epochs = {
            name: self.run(self.broadcaster.backend.position(self.name(name))).epoch for name in self.streams
        }
        self.ws: ClientConnection | None = None
        self.requests = 0
        self.payloads: dict[tuple[str, int], int] = {}
        #: Channels whose subscribed frame announced a resync that has not arrived yet.
        self.awaiting_resync: set[str] = set()
        self.pongs = 0
        self.open_connection()

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def name(self, channel: str) -> str:
        return self.prefix + channel

    # -- the client -----------------------------------------------------------------------------

    def open_connection(self) -> None:
        positions = {}
        server_side = self.streams[SERVER_SIDE]
        if server_side.position is not None:
            positions[self.name(SERVER_SIDE)] = server_side.position
        query = f"protocol=2&prefix={self.prefix}"
        if positions:
            query += f"&resume={encode_positions(positions)}"
        self.ws = self.run(connect(f"ws://{self.host}/ws?{query}"))
        welcome = self.receive()
        assert welcome["type"] == "welcome" and welcome["protocol"] == 2, welcome
        server_side.pending = "server"
        self.expect_answer(SERVER_SIDE, server_side.position)
        self.read_until(lambda: server_side.pending is None)

    def receive(self) -> dict[str, Any]:
        assert self.ws is not None
        frame: dict[str, Any] = json.loads(self.run(asyncio.wait_for(self.ws.recv(), TIMEOUT)))
        return frame

    def read_until(self, done: Any) -> None:
        while not done():
            self.handle(self.receive())

    def expect_answer(self, channel: str, resume: ResumePoint | None) -> None:
        """Note what the answer to a subscribe of ``channel`` from ``resume`` must be."""
        stream = self.streams[channel]
        if resume is None:
            stream.position = None
            self.expected = (channel, "fresh")
        elif resume.epoch != self.epochs[channel] or resume.seq > stream.top:
            self.expected = (channel, "resync")
        elif stream.top - resume.seq <= HISTORY:
            self.expected = (channel, "resume")
        else:
            self.expected = (channel, "resync" if self.exact_trim else "either")
        self.resume_from = resume

    def handle(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "event":
            channel = frame["channel"].removeprefix(self.prefix)
            stream = self.streams[channel]
            assert stream.subscribed, f"event of {channel} while not subscribed: {frame}"
            assert channel not in self.awaiting_resync, f"event before the resync it needs: {frame}"
            assert stream.position is not None
            event = frame["event"]
            assert event["seq"] == stream.position.seq + 1, (channel, event["seq"], stream.position)
            assert event["n"] == self.payloads[(channel, event["seq"])]
            stream.position = ResumePoint(stream.position.epoch, event["seq"])
        elif kind == "subscribed":
            channel = frame["channel"].removeprefix(self.prefix)
            stream = self.streams[channel]
            assert stream.pending == (frame["id"] or "server"), (frame, stream.pending)
            assert self.expected[0] == channel
            mode = self.expected[1]
            assert frame["epoch"] == self.epochs[channel]
            if mode == "fresh":
                assert (frame["seq"], frame["resumed"]) == (stream.top, False), (frame, stream.top)
            elif mode == "resume" or (mode == "either" and frame["resumed"]):
                assert self.resume_from is not None
                assert (frame["seq"], frame["resumed"]) == (self.resume_from.seq, True), frame
            else:
                assert frame["resumed"] is False
                self.awaiting_resync.add(channel)
            stream.subscribed = True
            stream.pending = None
            stream.position = ResumePoint(frame["epoch"], frame["seq"])
        elif kind == "resync_required":
            channel = frame["channel"].removeprefix(self.prefix)
            assert channel in self.awaiting_resync, f"resync without a gap: {frame}"
            self.awaiting_resync.discard(channel)
            self.streams[channel].position = ResumePoint(frame["epoch"], frame["seq"])
        elif kind == "pong":
            self.pongs -= 1
        elif kind == "unsubscribed":
            channel = frame["channel"].removeprefix(self.prefix)
            stream = self.streams[channel]
            assert stream.pending == frame["id"] and frame["reason"] == "client"
            stream.subscribed = False
            stream.pending = None
        else:
            raise AssertionError(f"unexpected frame {frame}")

    expected: tuple[str, str] = ("", "")
    resume_from: ResumePoint | None = None

    def request_id(self) -> str:
        self.requests += 1
        return f"r{self.requests}"

    # -- rules ----------------------------------------------------------------------------------

    @precondition(lambda self: self.ws is not None)
    @rule(
        channel=st.sampled_from(CHANNELS),
        mode=st.sampled_from(["fresh", "resume", "stale", "future", "wrong_epoch"]),
        delta=st.integers(1, 9),
    )
    def subscribe(self, channel: str, mode: str, delta: int) -> None:
        stream = self.streams[channel]
        if stream.subscribed:
            return
        last = stream.position.seq if stream.position is not None else 0
        epoch = self.epochs[channel]
        resume = {
            "fresh": None,
            "resume": ResumePoint(epoch, last) if stream.position is not None else None,
            "stale": ResumePoint(epoch, max(0, stream.top - delta)),
            "future": ResumePoint(epoch, stream.top + delta),
            "wrong_epoch": ResumePoint("not-" + epoch, last),
        }[mode]
        request_id = self.request_id()
        frame: dict[str, Any] = {"type": "subscribe", "id": request_id, "channel": self.name(channel)}
        if resume is not None:
            frame.update(epoch=resume.epoch, last_seq=resume.seq)
        stream.pending = request_id
        self.expect_answer(channel, resume)
        assert self.ws is not None
        self.run(self.ws.send(json.dumps(frame)))
        self.read_until(lambda: stream.pending is None)

    @precondition(lambda self: self.ws is not None)
    @rule(channel=st.sampled_from(CHANNELS))
    def unsubscribe(self, channel: str) -> None:
        stream = self.streams[channel]
        if not stream.subscribed:
            return
        request_id = stream.pending = self.request_id()
        assert self.ws is not None
        frame = {"type": "unsubscribe", "id": request_id, "channel": self.name(channel)}
        self.run(self.ws.send(json.dumps(frame)))
        self.read_until(lambda: stream.pending is None)

    @rule(channel=st.sampled_from((*CHANNELS, SERVER_SIDE)), count=st.integers(1, 8))
    def publish(self, channel: str, count: int) -> None:
        stream = self.streams[channel]
        for _ in range(count):
            n = len(self.payloads)
            seq = self.run(
                self.broadcaster.publish_json(self.name(channel), json.dumps({"type": "t", "n": n}))
            )
            assert seq == stream.top + 1
            stream.top = seq
            self.payloads[(channel, seq)] = n

    @precondition(lambda self: self.ws is not None)
    @rule()
    def catch_up(self) -> None:
        """Read until every subscribed channel is at its top (what was published has all arrived).

        A ping first: everything queued before its pong is read and checked on the way, so that an event
        that should not have come (after ``unsubscribed``, say) cannot hide unread in the socket.
        """
        assert self.ws is not None
        self.run(self.ws.send('{"type":"ping"}'))
        self.pongs += 1
        self.read_until(lambda: self.pongs == 0)
        self.read_until(
            lambda: (
                not self.awaiting_resync
                and all(
                    s.position is not None and s.position.seq == s.top
                    for s in self.streams.values()
                    if s.subscribed
                )
            )
        )

    @precondition(lambda self: self.ws is not None)
    @rule()
    def disconnect(self) -> None:
        self.catch_up()
        assert self.ws is not None
        self.run(self.ws.close())
        self.ws = None
        for stream in self.streams.values():
            stream.subscribed = False

    @precondition(lambda self: self.ws is None)
    @rule()
    def reconnect(self) -> None:
        self.open_connection()

    @invariant()
    def nothing_left_pending(self) -> None:
        assert all(stream.pending is None for stream in self.streams.values())

    def teardown(self) -> None:
        try:
            if self.ws is not None:
                self.catch_up()
                assert not self.awaiting_resync
                self.run(self.ws.close())
            self.run(self.stack.aclose())
            assert self.broadcaster.connection_count() == 0
        finally:
            self.loop.close()
            self.cleanup()


class OnMemory(OneConnection):
    def make_backend(self) -> Backend:
        return MemoryBackend(history_size=HISTORY)


SETTINGS = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.asyncio_only
def test_one_connection_many_channels_on_memory() -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(OnMemory, settings=SETTINGS)


@pytest.mark.redis
@pytest.mark.asyncio_only
def test_one_connection_many_channels_on_redis(redis_url: str) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    class OnRedis(OneConnection):
        exact_trim = False

        def make_backend(self) -> Backend:
            self.key_prefix = f"rtbp2sm-{uuid.uuid4().hex[:12]}"
            return RedisBackend(redis_url, key_prefix=self.key_prefix, history_size=HISTORY)

        def cleanup(self) -> None:
            delete_keys(redis_url, self.key_prefix)

    run_state_machine_as_test(OnRedis, settings=SETTINGS)
