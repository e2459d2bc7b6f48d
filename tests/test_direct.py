"""Frames written straight to uvicorn's transport (rtbroadcast.uvicorn): when that path is taken, byte-exact."""

from __future__ import annotations

import asyncio
import json
import os
import zlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode

from rtbroadcast import Broadcaster, Connection, QueueLimits
from rtbroadcast._websocket import deflated_text_frame, text_frame
from rtbroadcast.asgi import BroadcastEndpoint, channel_from_query
from rtbroadcast.starlette import lifespan, websocket_route

from .support import StalledClient, connect, recv_json, serve

#: The opt-in protocol class, as a service names it in uvicorn's ``ws`` setting.
DIRECT = "rtbroadcast.uvicorn:WebSocketProtocol"
DEFLATE = "rtbroadcast.uvicorn:DeflateWebSocketProtocol"

BOUNDARY_SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_text_frame_is_what_websockets_serialises(size: int) -> None:
    payload = b"a" * size
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


@given(st.binary(max_size=300))
def test_text_frame_header_lengths(payload: bytes) -> None:
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


def starlette_app(broadcaster: Broadcaster, **options: Any) -> Starlette:
    return Starlette(
        routes=[websocket_route("/ws", broadcaster, channel=channel_from_query("room"), **options)],
        lifespan=lifespan(broadcaster),
    )


def bare_endpoint(broadcaster: Broadcaster) -> Any:
    """The endpoint as the whole ASGI app: it gets uvicorn's own ``send``."""
    endpoint = BroadcastEndpoint(broadcaster, channel_from_query("room"))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            async with broadcaster:
                await send({"type": "lifespan.startup.complete"})
                message = await receive()
            assert message["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.complete"})
            return
        await endpoint(scope, receive, send)

    return app


async def _only_connection(broadcaster: Broadcaster, channel: str) -> Connection:
    for _ in range(200):
        connections = broadcaster.registry.fanout(channel)
        if connections:
            (connection,) = connections
            return connection
        await asyncio.sleep(0.01)
    raise AssertionError("no connection registered")


@pytest.mark.parametrize("mount", ["starlette", "bare"])
async def test_uncompressed_clients_get_direct_writes_with_every_size(mount: str) -> None:
    broadcaster = Broadcaster("memory://")
    app = starlette_app(broadcaster) if mount == "starlette" else bare_endpoint(broadcaster)
    async with serve(app, ws=DIRECT) as host:
        ws = await connect(f"ws://{host}/ws?room=r", compression=None, max_size=None)
        assert (await recv_json(ws))["type"] == "welcome"
        assert (await _only_connection(broadcaster, "r")).direct
        # Sizes around the 7-bit, 16-bit and 64-bit length encodings of the frame header.
        for size in BOUNDARY_SIZES:
            pad = "p" * max(0, size - len('{"type":"x","pad":"","seq":0}') - len(str(size)) + 1)
            await broadcaster.publish_json("r", json.dumps({"type": "x", "pad": pad}))
        for seq, _size in enumerate(BOUNDARY_SIZES, start=1):
            message = await recv_json(ws)
            assert message["seq"] == seq
        # Protocol frames (pong) take the same path.
        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv_json(ws))["type"] == "pong"
        await ws.close()


def _deflate_client(server_max_window_bits: int | None) -> ClientPerMessageDeflateFactory:
    return ClientPerMessageDeflateFactory(
        server_max_window_bits=server_max_window_bits, client_max_window_bits=True
    )


@pytest.mark.parametrize("server_max_window_bits", [None, 10])
async def test_deflate_clients_share_one_compressed_frame_per_event(
    server_max_window_bits: int | None,
) -> None:
    # DeflateWebSocketProtocol accepts permessage-deflate without server context takeover: the frame is
    # compressed once per event (per window size) and the client's own decoder must read it.
    broadcaster = Broadcaster("memory://")
    async with serve(starlette_app(broadcaster), ws=DEFLATE) as host:
        ws = await connect(
            f"ws://{host}/ws?room=z",
            compression=None,
            extensions=[_deflate_client(server_max_window_bits)],
            max_size=None,
        )
        assert ws.response is not None
        assert "server_no_context_takeover" in ws.response.headers["sec-websocket-extensions"]
        assert (await recv_json(ws))["type"] == "welcome"
        assert (await _only_connection(broadcaster, "z")).direct
        random_pad = os.urandom(3000).hex()  # compresses badly: goes out uncompressed
        pads = ["a" * size for size in BOUNDARY_SIZES] + [random_pad, "ab" * 40000]
        for pad in pads:
            await broadcaster.publish_json("z", json.dumps({"type": "x", "pad": pad}))
        for seq, pad in enumerate(pads, start=1):
            message = await recv_json(ws)
            assert (message["seq"], message["pad"]) == (seq, pad)
        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv_json(ws))["type"] == "pong"
        await ws.close()


def _split(frame: bytes) -> tuple[int, bytes]:
    """The first byte and the payload of one unmasked frame."""
    length, offset = frame[1] & 0x7F, 2
    if length == 126:
        length, offset = int.from_bytes(frame[2:4], "big"), 4
    elif length == 127:
        length, offset = int.from_bytes(frame[2:10], "big"), 10
    assert len(frame) == offset + length
    return frame[0], frame[offset:]


@given(
    st.one_of(st.binary(max_size=3000), st.text(max_size=40000).map(str.encode)), st.sampled_from([9, 12, 15])
)
def test_deflated_frames_inflate_to_the_payload(payload: bytes, bits: int) -> None:
    first, data = _split(deflated_text_frame(payload, bits))
    if first == 0xC1:  # FIN, RSV1 (compressed), text
        inflater = zlib.decompressobj(-bits)
        assert inflater.decompress(data + b"\x00\x00\xff\xff") == payload
        assert len(data) < len(payload)
    else:
        assert (first, data) == (0x81, payload)


async def test_opt_out_uses_asgi_send() -> None:
    broadcaster = Broadcaster("memory://")
    app = Starlette(
        routes=[
            websocket_route("/plain", broadcaster, channel=channel_from_query("room"), direct_write=False),
        ],
        lifespan=lifespan(broadcaster),
    )
    async with serve(app, ws=DIRECT) as host:
        plain = await connect(f"ws://{host}/plain?room=plain", compression=None)
        await recv_json(plain)
        assert not (await _only_connection(broadcaster, "plain")).direct
        await broadcaster.publish_json("plain", '{"type":"x"}')
        assert (await recv_json(plain))["seq"] == 1
        await plain.close()


async def test_browser_style_compression_offers_are_declined_by_default() -> None:
    broadcaster = Broadcaster("memory://")
    async with serve(starlette_app(broadcaster), ws=DIRECT) as host:
        ws = await connect(f"ws://{host}/ws?room=b", compression="deflate")
        assert ws.response is not None
        assert "sec-websocket-extensions" not in ws.response.headers
        await recv_json(ws)
        assert (await _only_connection(broadcaster, "b")).direct
        await broadcaster.publish_json("b", '{"type":"x"}')
        assert (await recv_json(ws))["seq"] == 1
        await ws.close()


@pytest.mark.parametrize("ws_option", ["auto", "websockets-sansio", "wsproto"])
async def test_other_websocket_implementations_use_asgi_send(ws_option: str) -> None:
    # Without the opt-in protocol class nothing is written past ASGI, whatever the implementation.
    broadcaster = Broadcaster("memory://")
    async with serve(starlette_app(broadcaster), ws=ws_option) as host:
        ws = await connect(f"ws://{host}/ws?room=w", compression=None)
        await recv_json(ws)
        assert not (await _only_connection(broadcaster, "w")).direct
        await broadcaster.publish_json("w", '{"type":"x"}')
        assert (await recv_json(ws))["seq"] == 1
        await ws.close()


async def test_direct_writes_stop_at_flow_control_and_the_queue_bound_applies() -> None:
    # A client that never reads: once the transport pauses, frames queue up, and past the bound the
    # connection is closed (4001) while a reading client gets everything.
    broadcaster = Broadcaster("memory://", queue_limits=QueueLimits(max_messages=20, max_size=2**20))
    async with serve(starlette_app(broadcaster), ws=DIRECT) as host:
        stalled = await StalledClient.open(host, "/ws?room=s")
        reader = await connect(f"ws://{host}/ws?room=s", compression=None, max_queue=None)
        await recv_json(reader)
        for _ in range(200):
            if broadcaster.connection_count("s") == 2:
                break
            await asyncio.sleep(0.01)
        assert all(c.direct for c in broadcaster.registry.fanout("s"))
        payload = json.dumps({"type": "blob", "blob": "z" * 8000})
        received: list[int] = []

        async def read() -> None:
            while len(received) < 1000:
                received.append((await recv_json(reader))["seq"])

        task = asyncio.create_task(read())
        for _ in range(1000):
            await broadcaster.publish_json("s", payload)
            await asyncio.sleep(0)
        await asyncio.wait_for(task, 20)
        assert received == list(range(1, 1001))
        assert broadcaster.stats().slow_consumers_closed == 1
        await reader.close()
        stalled.close()


@pytest.mark.parametrize("version", ["0.49.2", "0.55.0", "1.0.0", "dev"])
def test_unsupported_uvicorn_versions_are_refused_by_name(version: str) -> None:
    from rtbroadcast.errors import ConfigurationError
    from rtbroadcast.uvicorn import _check_version

    with pytest.raises(ConfigurationError, match=r"supports uvicorn >=0\.50, <0\.55 \(found uvicorn"):
        _check_version(version)


def test_the_installed_uvicorn_is_supported() -> None:
    import uvicorn

    from rtbroadcast.uvicorn import _check_version

    _check_version(uvicorn.__version__)


@pytest.mark.parametrize(("ws_max_size", "warned"), [(16 * 1024 * 1024, True), (16 * 1024, False)])
async def test_a_server_frame_limit_above_the_endpoint_s_warns_once(
    ws_max_size: int, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    broadcaster = Broadcaster("memory://")
    async with serve(starlette_app(broadcaster), ws=DIRECT, ws_max_size=ws_max_size) as host:
        for room in ("a", "b"):
            ws = await connect(f"ws://{host}/ws?room={room}", compression=None)
            await recv_json(ws)
            await ws.close()
    warnings = [
        r for r in caplog.records if r.name == "rtbroadcast.asgi" and "ws_max_size=16384" in r.message
    ]
    assert len(warnings) == (1 if warned else 0)
