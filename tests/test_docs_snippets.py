"""The documentation's code samples (docs/snippets/*.py) run here, against real servers and clients."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from rtbroadcast import CloseCode, ProtocolError, ResyncReason
from rtbroadcast.protocol import (
    ObservedCloseCode,
    SubscriptionErrorCode,
    decode_client_frame,
    decode_server_frame,
)

from .asyncapi_support import asyncapi_errors
from .sse_support import open_sse
from .support import MS, recv_json, serve, until

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
SNIPPETS = DOCS / "snippets"
sys.path.insert(0, str(SNIPPETS))  # the snippets import each other as top-level modules, as a reader's would


def docs_hooks() -> ModuleType:
    """Import docs/_tools/hooks.py, the docs build's hooks."""
    if "rtbroadcast_docs_hooks" not in sys.modules:
        spec = importlib.util.spec_from_file_location("rtbroadcast_docs_hooks", DOCS / "_tools" / "hooks.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["rtbroadcast_docs_hooks"]


def snippet(name: str) -> Any:
    """Import ``docs/snippets/<name>.py`` as the top-level module ``name``, as the docs build does."""
    module: Any = docs_hooks().load_snippet(name)
    return module


def fresh_room(name: str) -> str:
    """A room no other test (nor this test on the other event loop) used: the snippets' apps are module-level
    singletons, so their channels and stored messages outlive a test."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def _publish_over_http(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


# -- tutorial --------------------------------------------------------------------------------------


async def test_tutorial_app_broadcasts_a_post_to_websocket_and_sse_clients() -> None:
    tutorial = snippet("tutorial_app")
    async with serve(tutorial.app) as host:
        async with websockets.connect(f"ws://{host}/realtime?room=tutorial") as ws:
            welcome = await recv_json(ws)
            assert welcome["type"] == "welcome"
            assert welcome["channel"] == "room:tutorial"
            async with (
                httpx.AsyncClient(base_url=f"http://{host}", timeout=5) as client,
                client.stream("GET", "/realtime/sse?room=tutorial") as sse,
            ):
                lines = sse.aiter_lines()
                assert (await anext(lines)).startswith('data: {"type":"welcome"')
                reply = await _publish_over_http(
                    f"http://{host}", "/rooms/tutorial/messages", {"author": "ada", "text": "hello"}
                )
                event = await recv_json(ws)
                assert event["seq"] == reply["seq"] == welcome["seq"] + 1
                assert {k: event[k] for k in ("type", "room", "author", "text")} == {
                    "type": "message_posted",
                    "room": "tutorial",
                    "author": "ada",
                    "text": "hello",
                }
                assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", event["timestamp"])
                assert await anext(lines) == ""
                assert await anext(lines) == f"id: {welcome['epoch']}:{event['seq']}"
                assert json.loads((await anext(lines)).removeprefix("data: ")) == event
        async with httpx.AsyncClient(base_url=f"http://{host}") as client:
            snapshot = (await client.get("/rooms/tutorial/messages")).json()
        assert snapshot["epoch"] == welcome["epoch"]
        assert snapshot["seq"] == event["seq"]
        assert snapshot["messages"][-1]["text"] == "hello"


async def test_tutorial_cli_commands() -> None:
    """``rtbroadcast listen`` as the tutorial runs it, from another process."""
    tutorial = snippet("tutorial_app")
    room = fresh_room("cli-tutorial")
    async with serve(tutorial.app) as host:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "rtbroadcast",
            "listen",
            f"ws://{host}/realtime?room={room}",
            "--count",
            "1",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        async with asyncio.timeout(10_000 * MS):
            while b"welcome" not in await process.stderr.readline():
                pass
            await _publish_over_http(
                f"http://{host}", f"/rooms/{room}/messages", {"author": "a", "text": "b"}
            )
            out, _ = await process.communicate()
    assert process.returncode == 0
    assert out.decode().startswith("seq 1 message_posted (latency ")


async def test_the_tutorials_own_tests_pass() -> None:
    tests = snippet("test_tutorial_app")
    await tests.test_posting_a_message_broadcasts_it()
    await tests.test_websocket_clients_receive_it()
    await tests.test_a_client_follows_the_room()


# -- how-to guides ---------------------------------------------------------------------------------


async def test_the_testing_howtos_tests_pass() -> None:
    tests = snippet("test_fastapi_app")
    await tests.test_placing_an_order_broadcasts_it()
    await tests.test_a_device_receives_the_order_as_json()
    await tests.test_a_malformed_shop_id_is_refused()


async def test_fastapi_auth_reuses_the_apps_depends() -> None:
    from rtbroadcast.testing import connect, serve

    auth = snippet("fastapi_auth")
    async with serve(auth.app) as server:
        good = {"Authorization": "Bearer token-ada"}
        async with connect(server.ws_url("/realtime"), headers=good) as ws:
            assert ws.welcome is not None
            assert ws.welcome.channel == "user:ada"  # type: ignore[union-attr]
            await auth.broadcaster.publish_json("user:ada", '{"type":"note"}')
            assert (await ws.event())["type"] == "note"
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            async with connect(server.ws_url("/realtime"), headers={"Authorization": "Bearer nope"}):
                pass
        assert refused.value.response.status_code == 401
        async with httpx.AsyncClient() as http:
            assert (await http.get(server.url("/me"), headers=good)).json() == {"id": "ada"}
            nope = await http.get(server.url("/realtime/sse"), headers={"Authorization": "Bearer nope"})
            assert nope.status_code == 401
        async with (
            httpx.AsyncClient(headers=good) as http,
            open_sse(http, server.url("/realtime/sse")) as sse,
        ):
            assert (await sse.next_json())["channel"] == "user:ada"
            await auth.broadcaster.publish_json("user:ada", '{"type":"note"}')
            assert (await sse.next_json())["type"] == "note"


def test_the_testing_howtos_file_passes_under_pytest_on_its_own(tmp_path: Path) -> None:
    """As a user runs it: pytest on that one file (fixture included), with none of this suite's config."""
    config = tmp_path / "pytest.ini"
    config.write_text("[pytest]\nfilterwarnings = error\n")
    command = [sys.executable, "-m", "pytest", str(SNIPPETS / "test_fastapi_app.py"), "-c", str(config)]
    command += ["--rootdir", str(tmp_path), "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout, result.stdout


def test_the_testing_howtos_test_client_test_passes() -> None:
    snippet("test_fastapi_app").test_with_fastapis_test_client()


async def test_fastapi_app() -> None:
    fastapi_app = snippet("fastapi_app")
    async with serve(fastapi_app.app) as host:
        async with websockets.connect(f"ws://{host}/realtime?shop_id=shop-1") as ws:
            welcome = await recv_json(ws)
            reply = await _publish_over_http(f"http://{host}", "/shops/shop-1/orders", {"items": ["tea"]})
            event = await recv_json(ws)
            assert event["type"] == "order_placed"
            assert event["order_id"] == reply["order_id"]
            assert event["items"] == ["tea"]
            assert event["seq"] == reply["seq"] == welcome["seq"] + 1
            async with httpx.AsyncClient(base_url=f"http://{host}") as client:
                health = (await client.get("/health")).json()
            assert health["connections"] == 1
            assert health["channels"] == {"shop:shop-1": 1}
        with pytest.raises(ConnectionClosed) as info:  # the pattern refuses a malformed shop id
            async with websockets.connect(f"ws://{host}/realtime?shop_id=a/b") as ws:
                await recv_json(ws)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == CloseCode.BAD_REQUEST


@pytest.mark.parametrize(
    ("path", "headers", "allowed"),
    [
        ("/rooms/kitchen/ws?token=token-ada", {}, True),
        ("/rooms/kitchen/ws", {"Authorization": "Bearer token-ada"}, True),
        ("/rooms/lobby/ws?token=token-bob", {"Origin": "https://chat.example.com"}, True),
        ("/rooms/kitchen/ws?token=token-bob", {}, False),  # not a member
        ("/rooms/kitchen/ws", {}, False),  # no token
        ("/rooms/lobby/ws?token=token-bob", {"Origin": "https://evil.example"}, False),  # foreign site
    ],
)
async def test_starlette_app_authorizes(path: str, headers: dict[str, str], allowed: bool) -> None:
    starlette_app = snippet("starlette_app")
    async with (
        serve(starlette_app.app) as host,
        websockets.connect(f"ws://{host}{path}", additional_headers=headers) as ws,
    ):
        if not allowed:
            with pytest.raises(ConnectionClosed) as info:
                await recv_json(ws)
            assert info.value.rcvd is not None
            assert info.value.rcvd.code == CloseCode.FORBIDDEN
            return
        assert (await recv_json(ws))["type"] == "welcome"
        room = path.split("/")[2]
        event = snippet("tutorial_app").MessagePosted(room=room, author="x", text="y")
        await starlette_app.broadcaster.publish(f"room:{room}", event)
        assert (await recv_json(ws))["text"] == "y"


def test_subscribe_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(snippet("subscribe_in_process").main())
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["1 A-7 12", "2 B-2 0"]
    assert re.fullmatch(r"resume later from ResumePoint\(epoch='\w+', seq=2\)", lines[2])


# -- schemas ---------------------------------------------------------------------------------------


async def test_asyncapi_export_is_valid_and_the_cli_prints_it() -> None:
    document = snippet("asyncapi_export").document()
    assert asyncapi_errors(document) == []
    assert "message_posted" in document["channels"]["room"]["messages"]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rtbroadcast",
        "schema",
        "asyncapi_export:document",
        cwd=SNIPPETS,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30_000 * MS)
    assert process.returncode == 0
    assert json.loads(out) == document


# -- concepts: the client algorithm ----------------------------------------------------------------


async def test_resume_client_follows_resumes_and_resyncs() -> None:
    tutorial = snippet("tutorial_app")
    follower_module = snippet("resume_client")
    room = fresh_room("follow")
    channel = f"room:{room}"

    def post_directly(n: int) -> None:
        # What post_message does, without awaiting in between: the follower cannot run meanwhile.
        for i in range(n):
            event = tutorial.MessagePosted(room=room, author="bulk", text=str(i))
            tutorial.messages.setdefault(room, []).append(event.model_dump(mode="json"))
            coroutine = tutorial.broadcaster.publish(channel, event)
            try:
                coroutine.send(None)  # the memory backend completes a publish without suspending
            except StopIteration:
                continue
            raise AssertionError("publish suspended")

    def close_all(code: int) -> None:
        for connection in list(tutorial.broadcaster.registry):
            if connection.channel == channel:
                connection.close(code, "test")

    async with serve(tutorial.app) as host:
        base = f"http://{host}"
        for text in ("one", "two"):
            await _publish_over_http(base, f"/rooms/{room}/messages", {"author": "ada", "text": text})
        follower = follower_module.RoomFollower(base, room)
        task = asyncio.get_running_loop().create_task(follower.run())
        try:
            await until(lambda: tutorial.broadcaster.connection_count(channel) == 1, 10_000 * MS)
            await _publish_over_http(base, f"/rooms/{room}/messages", {"author": "bob", "text": "three"})
            await until(lambda: follower.seq == 3, 10_000 * MS)

            close_all(CloseCode.SLOW_CONSUMER)  # dropped: it resumes, and gets what it missed from history
            post_directly(2)
            await until(lambda: follower.seq == 5, 10_000 * MS)
            assert follower.snapshots == 1

            close_all(CloseCode.GOING_AWAY)  # more than history holds happens while it is away: resync
            post_directly(1001)
            await until(lambda: follower.seq == 1006 and follower.snapshots == 2, 10_000 * MS)
            await _publish_over_http(base, f"/rooms/{room}/messages", {"author": "ada", "text": "last"})
            await until(lambda: follower.seq == 1007, 10_000 * MS)
            assert follower.messages == tutorial.messages[room]
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


# -- reference pages -------------------------------------------------------------------------------


def test_close_code_table_lists_every_close_code_a_client_sees() -> None:
    """The table is in the Markdown (it reads right on GitHub) and says what the code says."""
    hooks = docs_hooks()
    page = (DOCS / "reference" / "protocol.md").read_text()
    assert hooks.refresh(page) == page, "the close-code table is stale: run python docs/_tools/hooks.py"
    table = page.split("<!-- rtbroadcast:close-codes -->")[1].split("<!-- /rtbroadcast:close-codes -->")[0]
    rows = table.strip().splitlines()[2:]
    expected = sorted([*CloseCode, *ObservedCloseCode])
    assert [int(row.split("`")[1]) for row in rows] == [int(code) for code in expected]
    assert [row.split("`")[3] for row in rows] == [code.name for code in expected]
    for row in rows:
        assert len(row.rsplit("|", 2)[1].strip()) > 10, f"no description: {row}"
    # What a client gets on a restart: 1001 from the drain, 1012 from uvicorn without one, 1006 if killed.
    for code in (1001, 1006, 1012):
        assert f"| `{code}` |" in table
    # Every table of the page is kept in it: the build has nothing left to fill in.
    assert hooks.expand(page) == page
    assert page.count("| `1012` |") == 1


def _kept_table(page: str, name: str) -> list[str]:
    """Return the rows of the table kept between ``page``'s ``name`` markers (header lines skipped)."""
    opening, closing = f"<!-- rtbroadcast:{name} -->", f"<!-- /rtbroadcast:{name} -->"
    assert opening in page and closing in page, f"no kept {name} table"
    return page.split(opening)[1].split(closing)[0].strip().splitlines()[2:]


@pytest.mark.parametrize("page_name", ["reference/protocol.md", "concepts/resume.md"])
def test_resync_reasons_are_listed_in_the_markdown(page_name: str) -> None:
    """Every ``ResyncReason``, in the page's source (it reads right on GitHub), as the code says it."""
    hooks = docs_hooks()
    page = (DOCS / page_name).read_text()
    assert hooks.refresh(page) == page, f"{page_name} is stale: run python docs/_tools/hooks.py"
    rows = _kept_table(page, "resync-reasons")
    reasons = [value for name, value in vars(ResyncReason).items() if name.isupper()]
    assert [row.split("`")[1] for row in rows] == reasons
    assert "backend_interrupted" in reasons
    for row in rows:
        assert len(row.rsplit("|", 2)[1].strip()) > 10, f"no description: {row}"


def test_error_codes_are_listed_in_the_markdown() -> None:
    hooks = docs_hooks()
    page = (DOCS / "reference" / "protocol.md").read_text()
    assert hooks.refresh(page) == page, "the error-code table is stale: run python docs/_tools/hooks.py"
    codes = [row.split("`")[1] for row in _kept_table(page, "error-codes")]
    pending: list[type[ProtocolError]] = list(ProtocolError.__subclasses__())
    expected: list[str] = []
    while pending:
        cls = pending.pop(0)
        expected.append(cls.code)
        pending.extend(cls.__subclasses__())
    assert sorted(codes) == sorted(expected)
    assert "unknown_type" in codes


def test_the_hook_rewrites_a_stale_kept_table() -> None:
    """What ``python docs/_tools/hooks.py`` does to a page whose table no longer says what the code says."""
    hooks = docs_hooks()
    page = (DOCS / "reference" / "protocol.md").read_text()
    stale = page
    for name in hooks.KEPT:
        opening, closing = f"<!-- rtbroadcast:{name} -->\n", f"<!-- /rtbroadcast:{name} -->"
        before, rest = stale.split(opening)
        stale = before + opening + "| old | table |\n" + closing + rest.split(closing)[1]
    assert stale != page
    assert hooks.refresh(stale) == page
    assert set(hooks.KEPT) == {"close-codes", "error-codes", "resync-reasons", "subscription-error-codes"}


def test_subscription_error_codes_are_listed_in_the_markdown() -> None:
    page = (DOCS / "reference" / "protocol.md").read_text()
    codes = [row.split("`")[1] for row in _kept_table(page, "subscription-error-codes")]
    expected = [value for name, value in vars(SubscriptionErrorCode).items() if name.isupper()]
    assert codes == expected
    assert {"forbidden", "too_many_subscriptions", "presence_unavailable"} <= set(codes)


def test_protocol_page_examples_are_real_frames() -> None:
    """Every JSON example on the wire protocol page decodes with the protocol module."""
    page = (DOCS / "reference" / "protocol.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", page, flags=re.S)
    assert len(blocks) >= 6
    seen = set()
    client_types = {"ping", "subscribe", "unsubscribe"}
    # A block is one frame, or (protocol 2's) one frame per line.
    examples = [
        line for block in blocks for line in ([block] if block.count("\n") == 1 else block.splitlines())
    ]
    for example in examples:
        frame = json.loads(example)
        seen.add(frame["type"])
        if frame["type"] in client_types:
            decode_client_frame(example, protocol=2 if frame["type"] != "ping" else 1)
        else:
            decode_server_frame(example)
    assert {"welcome", "pong", "error", "resync_required", "ping"} <= seen
    assert {"subscribe", "unsubscribe", "subscribed", "unsubscribed", "event"} <= seen
