"""The ``rtbroadcast`` command line, run as a real subprocess against real uvicorn servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import pytest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve

from rtbroadcast import Broadcaster, CloseCode, Event
from rtbroadcast._cli import EXIT_ERROR, EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, main
from rtbroadcast.asgi import ConnectionRequest, Deny, channel_from_query

from .asyncapi_support import asyncapi_errors
from .support import MS, broadcast_app, serve

SNIPPETS = Path(__file__).parent.parent / "docs" / "snippets"


class Beep(Event):
    type: Literal["cli_test.beep"] = "cli_test.beep"
    n: int


class Cli:
    """A running ``rtbroadcast`` subprocess whose output the test reads line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.out_lines: list[str] = []
        self.err_lines: list[str] = []

    async def wait_for(self, text: str) -> str:
        """Read stderr until a line contains ``text``; return that line."""
        assert self.process.stderr is not None
        return await self._read_until(self.process.stderr, self.err_lines, text)

    async def printed(self, text: str) -> str:
        """Read stdout (the events) until a line contains ``text``; return that line."""
        assert self.process.stdout is not None
        return await self._read_until(self.process.stdout, self.out_lines, text)

    async def _read_until(self, stream: asyncio.StreamReader, lines: list[str], text: str) -> str:
        async with asyncio.timeout(10_000 * MS):
            while True:
                raw = await stream.readline()
                if not raw:
                    raise AssertionError(f"{text!r} never came; so far: {lines}")
                line = raw.decode().rstrip("\n")
                lines.append(line)
                if text in line:
                    return line

    async def finish(self) -> tuple[int, list[str], list[str]]:
        """Wait for the exit; return the exit code, all stdout lines and all stderr lines."""
        async with asyncio.timeout(10_000 * MS):
            out, err = await self.process.communicate()
        self.out_lines += out.decode().splitlines()
        self.err_lines += err.decode().splitlines()
        assert self.process.returncode is not None
        return self.process.returncode, self.out_lines, self.err_lines


@contextlib.asynccontextmanager
async def cli(*args: str, cwd: Path | None = None) -> AsyncIterator[Cli]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rtbroadcast",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
    )
    try:
        yield Cli(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _app(broadcaster: Broadcaster, **options: Any) -> Starlette:
    """The app the listener connects to; the tests connect ``broadcaster`` themselves."""
    return broadcast_app(
        broadcaster, "/realtime", channel=channel_from_query("room"), with_lifespan=False, **options
    )


async def test_listen_prints_the_events_of_a_publish() -> None:
    async with (
        Broadcaster() as broadcaster,
        serve(_app(broadcaster)) as host,
        cli("listen", f"ws://{host}/realtime?room=lobby", "--count", "3") as proc,
    ):
        welcome = await proc.wait_for("welcome")
        assert "channel 'lobby'" in welcome
        assert "seq 0" in welcome
        for n in range(3):
            await broadcaster.publish("lobby", Beep(n=n))
        await broadcaster.publish("elsewhere", Beep(n=99))
        code, out, _ = await proc.finish()
    assert code == EXIT_OK
    assert len(out) == 3
    for seq, line in enumerate(out, start=1):
        assert line.startswith(f"seq {seq} cli_test.beep (latency ")
        assert " ms) " in line
        assert json.loads(line.split(" ms) ", 1)[1]) == {
            "type": "cli_test.beep",
            "timestamp": json.loads(line.split(" ms) ", 1)[1])["timestamp"],
            "n": seq - 1,
            "seq": seq,
        }


async def test_listen_answers_with_pings_and_shows_pongs() -> None:
    async with (
        Broadcaster() as broadcaster,
        serve(_app(broadcaster)) as host,
        cli("listen", f"ws://{host}/realtime?room=lobby", "--ping-interval", "0.05") as proc,
    ):
        line = await proc.wait_for("pong")
        assert "round trip" in line
        assert "server time" in line
        proc.process.send_signal(signal.SIGINT)
        code, _, err = await proc.finish()
    assert code == EXIT_OK  # Ctrl-C is a clean end
    assert err[-1] == "interrupted"


async def test_listen_reconnects_and_resumes_without_gap_or_duplicate() -> None:
    async with Broadcaster() as broadcaster, serve(_app(broadcaster)) as host:
        url = f"ws://{host}/realtime?room=lobby"
        async with cli("listen", url, "--count", "4", "--retry-delay", "0.05") as proc:
            await proc.wait_for("welcome")
            await broadcaster.publish("lobby", Beep(n=1))
            await proc.printed("seq 1 ")  # so that it resumes from seq 1
            for connection in list(broadcaster.registry):
                connection.close(CloseCode.SLOW_CONSUMER, "test: fell behind")
            # Published while the listener is away: it must get them from history when it resumes.
            await broadcaster.publish("lobby", Beep(n=2))
            await broadcaster.publish("lobby", Beep(n=3))
            await proc.wait_for("closed: code 4001 SLOW_CONSUMER")
            line = await proc.wait_for("connecting to")
            assert "epoch=" in line
            assert "last_seq=1" in line
            assert "room=lobby" in line
            assert "resumed: yes" in await proc.wait_for("welcome")
            await broadcaster.publish("lobby", Beep(n=4))
            code, out, err = await proc.finish()
    assert code == EXIT_OK
    assert [line.split(" ")[1] for line in out] == ["1", "2", "3", "4"]
    assert not [line for line in err if "gap" in line or "out of order" in line]


async def test_listen_resumes_from_the_command_line() -> None:
    async with Broadcaster() as broadcaster, serve(_app(broadcaster)) as host:
        for n in range(5):
            await broadcaster.publish("lobby", Beep(n=n))
        position = await broadcaster.backend.position("lobby")
        url = f"ws://{host}/realtime?room=lobby"
        args = ("--epoch", position.epoch, "--last-seq", "3", "--count", "2")
        async with cli("listen", url, *args) as proc:
            code, out, err = await proc.finish()
        assert code == EXIT_OK
        assert [line.split(" ")[1] for line in out] == ["4", "5"]
        assert any("resumed: yes" in line for line in err)

        async with cli("listen", url, "--epoch", "not-this-one", "--last-seq", "3", "--count", "1") as proc:
            await proc.wait_for("resync_required: epoch_changed")
            await broadcaster.publish("lobby", Beep(n=6))
            code, out, _ = await proc.finish()
        assert code == EXIT_OK
        assert out[0].startswith("seq 6 ")


@pytest.mark.parametrize(
    ("url_suffix", "expected"),
    [
        ("/realtime", "close code 4004 BAD_REQUEST"),  # no channel
        ("/realtime?room=secret", "close code 4003 FORBIDDEN: members only"),  # authorize denies
        # No such WebSocket route: Starlette refuses with 403, which is no authorization problem.
        ("/nowhere?room=lobby", "HTTP 403 on the WebSocket handshake: no route, most likely"),
        ("/gone?room=lobby", "HTTP 404 on the WebSocket handshake: no route at '/gone'"),
    ],
)
async def test_listen_exits_2_when_refused(url_suffix: str, expected: str) -> None:
    def authorize(request: ConnectionRequest, channel: str) -> bool | Deny:
        return Deny("members only") if channel == "secret" else True

    async def gone(websocket: WebSocket) -> None:
        await websocket.send_denial_response(Response("gone", status_code=404))

    async with Broadcaster() as broadcaster:
        app = _app(broadcaster, authorize=authorize)
        app.router.routes.append(WebSocketRoute("/gone", gone))
        async with (
            serve(app) as host,
            cli("listen", f"ws://{host}{url_suffix}", "--retry-delay", "0.01") as proc,
        ):
            code, out, err = await proc.finish()
    assert code == EXIT_REFUSED, err
    assert out == []
    assert any(expected in line for line in err), err
    assert not [line for line in err if "reconnecting" in line]


async def test_a_wrong_path_is_not_reported_as_an_auth_refusal() -> None:
    async with (
        Broadcaster() as broadcaster,
        serve(_app(broadcaster)) as host,
        cli("listen", f"ws://{host}/realtme?room=lobby") as proc,
    ):
        code, _out, err = await proc.finish()
    assert code == EXIT_REFUSED
    line = next(line for line in err if line.startswith("refused:"))
    assert "no route" in line and "'/realtme'" in line and "check the path" in line


async def test_max_retries_means_retries(capsys: pytest.CaptureFixture[str]) -> None:
    """``--max-retries N``: the first attempt and N retries, as the help and the reference page say."""
    assert _exit_code(["listen", "--help"]) == EXIT_OK
    help_text = " ".join(capsys.readouterr().out.split())
    assert "retries after a failed connection attempt" in help_text
    page = " ".join((SNIPPETS.parent / "reference" / "cli.md").read_text().split())
    assert "the first attempt and `--max-retries` retries all failed" in page
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for retries in (0, 1):
        args = ("--max-retries", str(retries), "--retry-delay", "0.01")
        async with cli("listen", f"ws://127.0.0.1:{port}/realtime?room=lobby", *args) as proc:
            code, _out, err = await proc.finish()
        assert code == EXIT_UNREACHABLE
        assert sum("connecting to" in line for line in err) == 1 + retries
        assert sum("reconnecting in" in line for line in err) == retries


async def test_listen_names_the_close_codes_of_the_server_and_the_network() -> None:
    """uvicorn's 1012 is no rtbroadcast code, but a client sees it on every restart without a drain."""

    async def restart(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "welcome", "channel": "c", "epoch": "e1", "seq": 0,
                                  "heartbeat_interval": 30, "resumed": False, "protocol": 1}))  # fmt: skip
        await ws.close(1012, "restarting")

    async with ws_serve(restart, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with cli("listen", f"ws://127.0.0.1:{port}/", "--retry-delay", "0.01") as proc:
            await proc.wait_for("closed: code 1012 SERVICE_RESTART 'restarting'")
            await proc.wait_for("reconnecting in")  # not a refusal: it comes back, with resume
            line = await proc.wait_for("connecting to")
            assert "epoch=e1" in line and "last_seq=0" in line


async def test_listen_exits_3_when_unreachable() -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ("--max-retries", "2", "--retry-delay", "0.01")
    async with cli("listen", f"ws://127.0.0.1:{port}/realtime?room=lobby", *args) as proc:
        code, _out, err = await proc.finish()
    assert code == EXIT_UNREACHABLE
    assert sum("connecting to" in line for line in err) == 3  # the first attempt and two retries
    assert err[-1] == "giving up: 3 attempt(s) in a row failed"


async def test_listen_shows_gaps_duplicates_resyncs_errors_and_a_clean_end() -> None:
    """Against a scripted server that misbehaves on purpose: what a correct server never sends.

    ``listen`` is the client: it applies what follows, drops a duplicate, reconnects on a gap (resuming
    from the last event applied) and shows each on stderr.
    """
    connections: list[str] = []

    async def script(ws: ServerConnection) -> None:
        assert ws.request is not None
        connections.append(ws.request.path)
        welcome = {"type": "welcome", "channel": "c", "epoch": "e1", "heartbeat_interval": 30, "protocol": 1}
        if len(connections) == 1:
            frames: list[dict[str, Any]] = [
                {**welcome, "seq": 0, "resumed": False},
                {"type": "x", "seq": 1},
                {"type": "x", "seq": 4},  # a gap: the client reconnects from seq 1
            ]
        else:
            frames = [
                {**welcome, "seq": 1, "resumed": True},
                {"type": "x", "seq": 2},
                {"type": "x", "seq": 2},
                {"type": "error", "code": "unknown_type", "message": "nope"},
                {"type": "resync_required", "reason": "history_trimmed", "epoch": "e2", "seq": 10},
                {"type": "x", "seq": 11, "timestamp": "2025-08-16T07:21:27.177385Z"},
            ]
        for frame in frames:
            await ws.send(json.dumps(frame))
        if len(connections) == 1:
            await ws.wait_closed()
            return
        await ws.send("not json")
        await ws.close(1000, "done")

    async with ws_serve(script, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with cli("listen", f"ws://127.0.0.1:{port}/", "--retry-delay", "0.01") as proc:
            code, out, err = await proc.finish()
    assert code == EXIT_OK
    assert [line.split(" (")[0] for line in out] == ["seq 1 x", "seq 2 x", "seq 11 x"]
    assert "latency ?" in out[0]
    assert "latency ?" not in out[2]
    assert len(connections) == 2 and "epoch=e1" in connections[1] and "last_seq=1" in connections[1]
    text = "\n".join(err)
    assert "gap: expected seq 2, received 4" in text
    assert "duplicate: seq 2 (already applied): dropped" in text
    assert "error from server: unknown_type: nope" in text
    assert "resync_required: history_trimmed; continuing from epoch e2 seq 10" in text
    assert "unreadable frame" in text
    assert "closed: code 1000 NORMAL 'done'" in text


def test_listen_rejects_a_bad_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["listen", "http://example.com/"]) == EXIT_ERROR
    assert _exit_code(["listen", "ws://example.com/", "--epoch", "e"]) == EXIT_ERROR
    assert "go together" in capsys.readouterr().err


def _exit_code(argv: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def test_schema_prints_the_asyncapi_document(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    module = "cli_schema_target"
    assert (
        main(["schema", f"{module}:broadcaster", "--title", "Beeps", "--server", "local=ws://127.0.0.1:8000"])
        == 0
    )
    document = json.loads(capsys.readouterr().out)
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "Beeps"
    assert document["servers"]["local"]["host"] == "127.0.0.1:8000"
    assert "cli_target.ping_pong" in document["components"]["messages"]

    assert main(["schema", f"{module}:make_document"]) == 0
    assert json.loads(capsys.readouterr().out)["channels"]["beeps"]["address"] == "/beeps"

    assert main(["schema", f"{module}:SPEC"]) == 0
    channel = json.loads(capsys.readouterr().out)["channels"]["beeps"]
    assert channel["address"] == "/beeps"
    assert "room" in channel["bindings"]["ws"]["query"]["properties"]


def test_schema_finds_the_broadcast_endpoints_of_a_fastapi_app(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert main(["schema", "cli_schema_target:app", "--server", "local=ws://127.0.0.1:8000"]) == EXIT_OK
    document = json.loads(capsys.readouterr().out)
    assert asyncapi_errors(document) == []
    channels = document["channels"]
    assert set(channels) == {"realtime", "realtime_sse", "mounted_live"}
    assert channels["realtime"]["address"] == "/realtime"
    assert (
        "room" in channels["realtime"]["bindings"]["ws"]["query"]["properties"]
    )  # channel_from_query("room")
    assert channels["realtime_sse"]["address"] == "/realtime/sse"
    assert channels["mounted_live"]["address"] == "/mounted/live"  # under a Mount, behind a wrapper
    assert "cli_target.ping_pong" in channels["realtime"]["messages"]


def test_schema_documents_what_it_finds_and_names_the_routes_it_cannot_see_into(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert main(["schema", "cli_schema_target:mixed_app"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert set(json.loads(out)["channels"]) == {"realtime", "realtime_sse"}
    assert "not documented: the WebSocket routes /private are functions" in err
    assert main(["schema", "cli_schema_target:app"]) == EXIT_OK
    assert capsys.readouterr().err == ""  # every WebSocket route of that app is an endpoint


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_colon", "expected MODULE:ATTR"),
        ("no_such_module_here:x", "ModuleNotFoundError"),
        ("cli_schema_target:missing", "AttributeError"),
        ("cli_schema_target:NOT_A_SOURCE", "point at a Starlette or FastAPI app, a Broadcaster"),
        (
            "cli_schema_target:empty_app",
            "found no BroadcastEndpoint in the routes of cli_schema_target:empty_app",
        ),
        (
            "cli_schema_target:depends_app",
            "the WebSocket routes /private are functions, which rtbroadcast cannot see into (a route that "
            "calls serve_websocket() or returns sse_response() behind the app's Depends): describe them "
            "with a ChannelSpec",
        ),
    ],
)
def test_schema_reports_a_bad_target(
    target: str, message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert main(["schema", target]) == EXIT_ERROR
    assert message in capsys.readouterr().err
