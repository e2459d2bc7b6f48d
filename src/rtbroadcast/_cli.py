"""The ``rtbroadcast`` command: listen to a channel like a client would, or print an AsyncAPI document.

    rtbroadcast listen 'ws://127.0.0.1:8000/realtime?room=lobby'
    rtbroadcast schema myapp.realtime:broadcaster

``listen`` is :class:`rtbroadcast.client.Client` with a printer attached: it prints every event the
client applies on stdout with its seq and latency, and what happens to the connection on stderr (attempts,
welcome, pongs, duplicates dropped, gaps, resyncs, closes and reconnects). It resumes after a reconnect
with the ``epoch`` and ``last_seq`` query parameters, exactly as the client does for an application.

Exit codes: 0 clean end (the server closed with 1000, ``--count`` reached, or Ctrl-C); 1 an error (bad
command line, a module that does not import); 2 the server refused the connection (close code 4003/4004, or
HTTP 403/404 on the handshake: most often a wrong path); 3 the server stayed unreachable: the first attempt
and ``--max-retries`` retries all failed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, NoReturn, TextIO
from urllib.parse import urlsplit

from .protocol import (
    CloseCode,
    EventFrame,
    ObservedCloseCode,
    Pong,
    ResyncRequired,
    ServerFrame,
    Welcome,
    WelcomeV2,
    judge_event,
)

if TYPE_CHECKING:
    from .client import Client, ClientError, DisconnectInfo, Refused, Subscription

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_REFUSED", "EXIT_UNREACHABLE", "main"]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_REFUSED: Final = 2
EXIT_UNREACHABLE: Final = 3

_MAX_DELAY: Final = 10.0
#: ``--ping-interval 0``: no pings (and so no dead-connection detection): a day between them.
_NO_PINGS: Final = 86_400.0
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class Listener:
    """Follow a broadcast endpoint with :class:`rtbroadcast.client.Client` and print what happens.

    Args:
        url: the endpoint's ``ws://`` or ``wss://`` URL, channel parameters included.
        epoch: resume from this epoch (with ``last_seq``).
        last_seq: resume after this seq (with ``epoch``).
        ping_interval: seconds between JSON pings; ``None`` follows the welcome's heartbeat interval, 0
            sends none.
        max_retries: retries after a failed connection attempt before giving up: at most ``max_retries + 1``
            attempts fail in a row. A connection that got its ``welcome`` resets the count.
        retry_delay: the first backoff ceiling: each delay is random below it (full jitter), and it
            doubles per failed attempt up to 10 s.
        count: stop after this many events.
        headers: extra HTTP headers for the handshake.
        out: where events go.
        err: where connection news goes.
    """

    def __init__(
        self,
        url: str,
        *,
        epoch: str | None = None,
        last_seq: int | None = None,
        ping_interval: float | None = None,
        max_retries: int = 8,
        retry_delay: float = 0.5,
        count: int | None = None,
        headers: Sequence[tuple[str, str]] = (),
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
    ) -> None:
        self.url = url
        self.epoch = epoch
        self.last_seq = last_seq
        self.ping_interval = ping_interval
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.count = count
        self.headers = list(headers)
        self.out = out
        self.err = err
        self.received = 0
        self._subscription: Subscription[dict[str, Any]] | None = None
        self._requested = False  # whether the current attempt resumes from a position
        self._failures = 0  # attempts in a row without a welcome
        self._last_close: DisconnectInfo | None = None
        self._client: Client | None = None

    def _say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    async def run(self) -> int:
        """Listen until a clean end, a refusal, or too many failed attempts; return the exit code."""
        from .client import Backoff, Client, Refused, Unreachable

        interval = self.ping_interval
        client = Client(
            self.url,
            headers=self.headers,
            backoff=Backoff(initial_delay=self.retry_delay, max_delay=max(_MAX_DELAY, self.retry_delay)),
            heartbeat_interval=None if interval is None else (interval or _NO_PINGS),
            max_retries=self.max_retries,
            on_connecting=self._on_connecting,
            on_connect=self._on_welcome,
            on_disconnect=self._on_disconnect,
            on_error=self._on_error,
            on_frame=self._on_frame,
        )
        self._client = client
        position = None if self.epoch is None or self.last_seq is None else (self.epoch, self.last_seq)
        async with client:
            self._subscription = subscription = client.subscribe(position=position)
            try:
                async for received in subscription:
                    self._print_event(received.seq, received.event)
                    if self.count is not None and self.received >= self.count:
                        break
            except Refused as exc:
                self._say(f"refused: {self._refusal(exc)}")
                return EXIT_REFUSED
            except Unreachable:
                self._say(f"giving up: {self._failures} attempt(s) in a row failed")
                return EXIT_UNREACHABLE
        return EXIT_OK

    # -- what the client tells us ----------------------------------------------------------------------

    def _on_connecting(self, url: str) -> None:
        self._requested = self._subscription is not None and self._subscription.position is not None
        self._failures += 1
        self._say(f"connecting to {url}")

    def _on_welcome(self, welcome: Welcome | WelcomeV2) -> None:
        self._failures = 0
        if not isinstance(welcome, Welcome):  # listen speaks protocol 1
            return
        self._say(
            f"welcome: channel {welcome.channel!r}, epoch {welcome.epoch}, seq {welcome.seq}, "
            f"heartbeat {welcome.heartbeat_interval:g} s"
            + (f", resumed: {'yes' if welcome.resumed else 'no'}" if self._requested else "")
        )

    def _on_frame(self, frame: ServerFrame) -> None:
        subscription = self._subscription
        if isinstance(frame, Pong):
            rtt = self._rtt()
            shown = f"round trip {rtt * 1000:.1f} ms" if rtt is not None else "unsolicited"
            self._say(f"pong: {shown}, server time {frame.timestamp}")
        elif isinstance(frame, ResyncRequired):
            self._say(
                f"resync_required: {frame.reason}; continuing from epoch {frame.epoch} seq {frame.seq} "
                "(an app would reload its snapshot now)"
            )
        elif (
            isinstance(frame, EventFrame)
            and subscription is not None
            and judge_event(subscription.position, frame.seq) == "duplicate"
        ):
            self._say(f"duplicate: seq {frame.seq} (already applied): dropped")

    def _rtt(self) -> float | None:
        return self._client.stats.round_trip if self._client is not None else None

    def _on_error(self, error: ClientError) -> None:
        text = error.message
        if text.startswith("the server rejected a frame: "):
            text = "error from server: " + text.removeprefix("the server rejected a frame: ")
        self._say(text)

    def _on_disconnect(self, info: DisconnectInfo) -> None:
        self._last_close = info
        reason = f" {info.reason!r}" if info.reason else ""
        self._say(f"closed: {_describe_close(info.code)}{reason}")
        if info.retry_in is None:
            return
        position = self._subscription.position if self._subscription is not None else None
        resume = "" if position is None else f" (resume from epoch {position.epoch} seq {position.seq})"
        self._say(f"reconnecting in {info.retry_in:.2f} s{resume}")

    def _print_event(self, seq: int, event: dict[str, Any]) -> None:
        self.received += 1
        latency = _latency_ms(event.get("timestamp"))
        shown = f"latency {latency:.1f} ms" if latency is not None else "latency ?"
        print(
            f"seq {seq} {event['type']} ({shown}) {_dumps({**event, 'seq': seq})}", file=self.out, flush=True
        )

    def _refusal(self, exc: Refused) -> str:
        if exc.status is not None:
            return _refusal(exc.status, self.url)
        close = self._last_close
        reason = close.reason if close is not None else ""
        return f"close code {exc.code} {_close_name(exc.code)}{f': {reason}' if reason else ''}"


def _latency_ms(timestamp: object) -> float | None:
    if not isinstance(timestamp, str):
        return None
    try:
        sent = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if sent.tzinfo is None:
        sent = sent.replace(tzinfo=UTC)
    return (datetime.now(UTC) - sent).total_seconds() * 1000


def _close_name(code: int | None) -> str:
    if code is None:
        return "(no close frame)"
    for codes in (CloseCode, ObservedCloseCode):
        try:
            return codes(code).name
        except ValueError:
            pass
    return "(not an rtbroadcast code)"


def _refusal(status: int, url: str) -> str:
    """Explain an HTTP refusal of the handshake: rtbroadcast itself refuses with close codes, not HTTP."""
    path = urlsplit(url).path or "/"
    if status == 403:
        # Starlette (and uvicorn, for an app that closes before accepting) answers 403 to a WebSocket
        # handshake on a path no WebSocket route serves; rtbroadcast refuses with 4003/4004 after accepting.
        return (
            f"HTTP 403 on the WebSocket handshake: no route, most likely: nothing serves WebSocket at "
            f"{path!r} (check the path; Starlette and FastAPI answer 403 to a handshake on an unknown path, "
            "while rtbroadcast refuses with close code 4003 or 4004)"
        )
    return (
        f"HTTP {status} on the WebSocket handshake: no route at {path!r} (check the path), or a server "
        "without WebSocket support (plain uvicorn has none: install 'uvicorn[standard]')"
    )


def _describe_close(code: int | None) -> str:
    if code is None or code == 1006:
        return "the connection dropped without a close frame"
    return f"code {code} {_close_name(code)}"


# -- schema ----------------------------------------------------------------------------------------


def _load(target: str) -> Any:
    """Import ``MODULE:ATTR`` (``ATTR`` may be dotted) from the current directory or ``sys.path``.

    Raises:
        ValueError: ``target`` is not ``MODULE:ATTR``.
        ImportError: the module does not import.
        AttributeError: the attribute does not exist.
    """
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected MODULE:ATTR, like myapp.realtime:broadcaster, not {target!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    obj: Any = importlib.import_module(module_name)
    for name in attribute.split("."):
        obj = getattr(obj, name)
    return obj


def _schema_document(obj: Any, args: argparse.Namespace) -> dict[str, Any]:
    from .broadcaster import Broadcaster
    from .schema import ChannelSpec, asyncapi_document

    if _is_app(obj):  # an ASGI app is callable too, but not with no arguments
        obj = _app_specs(obj, args.target)
    elif callable(obj) and not isinstance(obj, (type, Broadcaster, ChannelSpec)):
        obj = obj()
        if _is_app(obj):
            obj = _app_specs(obj, args.target)
    if isinstance(obj, dict):
        return obj
    specs_given = isinstance(obj, (list, tuple)) and obj and all(isinstance(x, ChannelSpec) for x in obj)
    if not (isinstance(obj, (Broadcaster, ChannelSpec)) or specs_given):
        raise TypeError(
            f"{args.target} is a {type(obj).__name__}; point at a Starlette or FastAPI app, a Broadcaster, "
            "a ChannelSpec (or a list of them), an AsyncAPI document (dict), or a function returning one of "
            "these"
        )
    servers = dict(_server_option(value) for value in args.server)
    return asyncapi_document(obj, title=args.title, version=args.api_version, servers=servers or None)


def _is_app(obj: Any) -> bool:
    """Whether ``obj`` looks like a Starlette (or FastAPI) application or router: it has routes."""
    return not isinstance(obj, type) and isinstance(getattr(obj, "routes", None), list)


def _app_specs(app: Any, target: str) -> list[Any]:
    """Return a :class:`~rtbroadcast.schema.ChannelSpec` per broadcast endpoint in ``app``'s routes.

    Raises:
        TypeError: no route of ``app`` serves a :class:`~rtbroadcast.asgi.BroadcastEndpoint`.
    """
    from .schema import ChannelSpec

    # endpoint -> [WebSocket path, SSE path]: broadcast_routes mounts one endpoint on both.
    found: dict[int, tuple[Any, list[str | None]]] = {}
    unseen: list[str] = []  # WebSocket routes served by a function (serve_websocket behind Depends)
    for path, is_websocket, endpoint in _broadcast_routes(app.routes, ""):
        if endpoint is None:
            unseen.append(path)
            continue
        paths = found.setdefault(id(endpoint), (endpoint, [None, None]))[1]
        paths[0 if is_websocket else 1] = paths[0 if is_websocket else 1] or path
    functions = (
        f"the WebSocket routes {', '.join(unseen)} are functions, which rtbroadcast cannot see into (a "
        "route that calls serve_websocket() or returns sse_response() behind the app's Depends): "
        "describe them with a ChannelSpec, or a function returning a list of them"
    )
    if not found:
        raise TypeError(
            f"found no BroadcastEndpoint in the routes of {target} (a {type(app).__name__}); "
            + (f"{functions}; " if unseen else "")
            + "mount one (broadcast_routes, websocket_route), or point at a Broadcaster, a ChannelSpec (or "
            "a list of them), or a function returning an AsyncAPI document"
        )
    if unseen:
        print(f"rtbroadcast schema: not documented: {functions}", file=sys.stderr)
    specs = []
    taken: set[str] = set()
    for endpoint, (websocket_path, sse_path) in found.values():
        base = (websocket_path or sse_path or "").strip("/")
        name = _KEY_RE.sub("_", base) or "broadcast"
        while name in taken:
            name += "_"
        taken.add(name)
        parameter = _query_parameter(endpoint.resolve_channel)
        address, parameters = websocket_path, {}
        if parameter is not None and address is not None:
            address += f"?{parameter}={{{parameter}}}"
            parameters[parameter] = "Names the channel to receive."
        sse_address = sse_path if endpoint.sse else None
        specs.append(ChannelSpec(address, name=name, parameters=parameters, sse_address=sse_address))
    return specs


_KEY_RE: Final = re.compile(r"[^A-Za-z0-9_\-]")


def _broadcast_routes(routes: list[Any], prefix: str) -> Iterator[tuple[str, bool, Any]]:
    """Yield ``(path, is_websocket, endpoint)`` for each route, mounted ones too, that serves an endpoint.

    A WebSocket route served by anything else (a function) is yielded with ``endpoint`` ``None``.
    """
    from .asgi import BroadcastEndpoint

    for route in routes:
        path = prefix + str(getattr(route, "path", ""))
        nested = getattr(route, "routes", None)
        if isinstance(nested, list) and nested is not routes:  # a Mount or an included router
            yield from _broadcast_routes(nested, path)
            continue
        candidate = getattr(route, "endpoint", None)
        for _ in range(8):  # through wrappers that keep the wrapped app as ``app``, as ASGI middleware does
            if isinstance(candidate, BroadcastEndpoint) or candidate is None:
                break
            candidate = getattr(candidate, "app", None)
        # A WebSocket route has no HTTP methods.
        is_websocket = getattr(route, "methods", None) is None and hasattr(route, "endpoint")
        if isinstance(candidate, BroadcastEndpoint):
            yield path, is_websocket, candidate
        elif is_websocket:
            yield path, True, None


def _query_parameter(resolver: Any) -> str | None:
    """Return the query parameter that a ``channel_from_query`` resolver reads, or ``None``."""
    # Our own function keeps the name in its closure (the endpoint exposes only the resolver): read it there.
    if getattr(resolver, "__qualname__", "") != "channel_from_query.<locals>.resolve":
        return None
    name = inspect.getclosurevars(resolver).nonlocals.get("name")
    return name if isinstance(name, str) else None


def _server_option(value: str) -> tuple[str, str]:
    name, sep, url = value.partition("=")
    if not sep or not name or not url:
        raise argparse.ArgumentTypeError(f"--server takes NAME=URL, not {value!r}")
    return name, url


# -- command line ----------------------------------------------------------------------------------


def _header(value: str) -> tuple[str, str]:
    name, sep, text = value.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"a header looks like 'Name: value', not {value!r}")
    return name.strip(), text.strip()


class _Parser(argparse.ArgumentParser):
    """Exit with 1 on a usage error: exit code 2 means the server refused the connection."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rtbroadcast",
        description="Listen to an rtbroadcast channel, or print the AsyncAPI document of a broadcaster.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listen = commands.add_parser(
        "listen",
        help="connect to a broadcast endpoint and print its events",
        description="Connect to a broadcast endpoint and print each event with its seq and latency. "
        "Reconnects with resume. Exit codes: 0 clean end or Ctrl-C, 2 refused, 3 unreachable.",
    )
    listen.add_argument(
        "url", help="the endpoint's ws:// or wss:// URL, e.g. 'ws://host/realtime?room=lobby'"
    )
    listen.add_argument("--epoch", help="resume from this epoch (needs --last-seq)")
    listen.add_argument("--last-seq", type=int, metavar="N", help="resume after this seq (needs --epoch)")
    listen.add_argument(
        "--ping-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between JSON pings (default: the welcome's heartbeat interval; 0: none, and no "
        "dead-connection detection)",
    )
    listen.add_argument(
        "--max-retries",
        type=int,
        default=8,
        metavar="N",
        help="retries after a failed connection attempt before giving up with exit code 3 (default: 8; "
        "0: give up after the first failure)",
    )
    listen.add_argument(
        "--retry-delay",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="first backoff ceiling: delays are random below it, doubling up to 10 s (default: 0.5)",
    )
    listen.add_argument("--count", type=int, metavar="N", help="exit after N events")
    listen.add_argument(
        "-H",
        "--header",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="an extra handshake header, e.g. 'Authorization: Bearer ...' (repeatable)",
    )

    schema = commands.add_parser(
        "schema",
        help="print the AsyncAPI 3.0 document of a broadcaster",
        description="Import MODULE and print the AsyncAPI 3.0 document of ATTR: a Broadcaster, a "
        "ChannelSpec or a list of them, an AsyncAPI document, or a function returning one of these.",
    )
    schema.add_argument("target", metavar="MODULE:ATTR", help="e.g. myapp.realtime:broadcaster")
    schema.add_argument("--title", default="rtbroadcast events", help="the document's title")
    schema.add_argument("--api-version", default="1.0.0", metavar="VERSION", help="the API's version")
    schema.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="a server, e.g. local=ws://127.0.0.1:8000 (repeatable)",
    )
    schema.add_argument("--indent", type=int, default=2, help="JSON indentation (default: 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rtbroadcast`` command line; return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "schema":
        return _schema_command(args)
    return _listen_command(parser, args)


def _schema_command(args: argparse.Namespace) -> int:
    try:
        document = _schema_document(_load(args.target), args)
        text = json.dumps(document, indent=args.indent or None, ensure_ascii=False)
    except Exception as exc:  # a user's module can fail in any way: report it, don't dump a traceback
        print(f"rtbroadcast schema: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(text)
    return EXIT_OK


def _listen_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if (args.epoch is None) != (args.last_seq is None):
        parser.error("--epoch and --last-seq go together")
    if args.last_seq is not None and args.last_seq < 0:
        parser.error("--last-seq must be >= 0")
    if urlsplit(args.url).scheme not in ("ws", "wss"):
        parser.error(f"the URL must start with ws:// or wss://, not {args.url!r}")
    try:
        import websockets  # noqa: F401
    except ImportError:
        print("rtbroadcast listen needs websockets: pip install 'rtbroadcast[cli]'", file=sys.stderr)
        return EXIT_ERROR
    listener = Listener(
        args.url,
        epoch=args.epoch,
        last_seq=args.last_seq,
        ping_interval=args.ping_interval,
        max_retries=max(args.max_retries, 0),
        retry_delay=max(args.retry_delay, 0.0),
        count=args.count,
        headers=args.header,
    )
    # Everything the client has to say reaches the listener's callbacks, which print it; its logger would
    # only say it twice.
    client_logger = logging.getLogger("rtbroadcast.client")
    client_logger.addHandler(logging.NullHandler())
    client_logger.propagate = False
    try:
        return asyncio.run(listener.run())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
