"""``python -m examples.restaurant_app``: run the service with uvicorn, or mint a device token.

python -m examples.restaurant_app --host 127.0.0.1 --port 8000 --demo
python -m examples.restaurant_app token --restaurant test-restaurant-1 --ttl 3600
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import secrets
import sys
from typing import Any
from urllib.parse import urlencode

import uvicorn
from sqlalchemy.engine import make_url

from rtbroadcast.protocol import DEFAULT_MAX_FRAME_SIZE

from .app import DEMO_RESTAURANT_ID, create_app
from .auth import mint_token
from .config import Settings

#: Lifetime of the tokens ``--demo`` prints, in seconds.
DEMO_TOKEN_TTL = 24 * 3600

_TOKEN_IN_URL = re.compile(r"(?<=[?&]token=)[^&\s\"']+")


class RedactTokens(logging.Filter):
    """Replace ``token=...`` in log records (uvicorn logs request URLs with their query) by ``token=***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg = _TOKEN_IN_URL.sub("***", message)
            record.args = None
        return True


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Return the uvicorn settings the service runs with (host and port aside)."""
    return {
        "log_level": settings.log_level.lower(),
        # rtbroadcast's protocol class: frames written once per event for all devices, the 4001 close
        # frame ahead of flow control, and permessage-deflate declined (see docs/performance.md).
        "ws": "rtbroadcast.uvicorn:WebSocketProtocol",
        # The real client-frame limit: uvicorn refuses a larger frame from its header (close 1009)
        # before buffering it. The endpoint keeps its default max_frame_size, the same 16 KiB.
        "ws_max_size": DEFAULT_MAX_FRAME_SIZE,
        "ws_ping_interval": settings.heartbeat_interval,
        "ws_ping_timeout": settings.heartbeat_timeout,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the service (default) or the ``token`` command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["token"]:
        token_command(argv[1:])
    else:
        serve_command(argv)


def token_command(argv: list[str]) -> None:
    """Print a device token signed with ``RESTAURANT_TOKEN_SECRET``."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.restaurant_app token",
        description="Print a device token for one restaurant, signed with RESTAURANT_TOKEN_SECRET.",
    )
    parser.add_argument("--restaurant", required=True, help="the restaurant id the token is bound to")
    parser.add_argument("--ttl", type=float, default=3600, help="lifetime in seconds (default: 3600)")
    parser.add_argument("--device", default=None, help="device id, the token's `sub` (default: random)")
    parser.add_argument(
        "--name", default=None, help="display name other devices see (presence; default: none)"
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if settings.token_secret is None:
            raise ValueError("RESTAURANT_TOKEN_SECRET is not set: the token would not be accepted")
        token = mint_token(
            settings.token_secret, args.restaurant, device_id=args.device, name=args.name, ttl=args.ttl
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(token)


def serve_command(argv: list[str]) -> None:
    """Parse the command line, print where the service listens, and serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.restaurant_app",
        description="Run the rtbroadcast example restaurant service (configuration: see README.md). "
        "`python -m examples.restaurant_app token --help` mints device tokens.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument(
        "--demo",
        action="store_true",
        help=f"seed the demo restaurant {DEMO_RESTAURANT_ID!r} with tables, generate a token secret if "
        "none is configured, and print ready-to-use tokens",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        parser.error(str(exc))
    if args.demo:
        settings = dataclasses.replace(settings, demo=True)
    generated_secret = settings.demo and settings.auth_mode == "unconfigured"
    if generated_secret:
        settings = dataclasses.replace(settings, token_secret=secrets.token_urlsafe(32))
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        app = create_app(settings)
    except ValueError as exc:
        parser.error(str(exc))

    http = f"http://{args.host}:{args.port}"
    ws = f"ws://{args.host}:{args.port}"
    database = make_url(settings.database_url).render_as_string(hide_password=True)
    print(f"rtbroadcast restaurant service on {http}")
    print(f"  database   {database}")
    print(f"  broadcast  {settings.broadcast_url.split('://', 1)[0]}://")
    print(f"  auth       {settings.auth_mode}")
    print(f"  API docs   {http}/docs")
    print(f"  health     {http}/health")
    restaurant = DEMO_RESTAURANT_ID if settings.demo else "<restaurant_id>"
    token = None
    if settings.demo and settings.token_secret is not None:
        token = mint_token(settings.token_secret, restaurant, device_id="demo-device", ttl=DEMO_TOKEN_TTL)
    query = {"restaurant_id": restaurant, **({"token": token} if token else {})}
    if token is None and settings.token_secret is not None:
        query["token"] = "<token>"
    print(f"  realtime   {ws}/realtime?{urlencode(query, safe='<>')}")
    print(f"  host stand {http}/host-stand/?{urlencode(query, safe='<>')}")
    print(f"  guests     {http}/restaurants/{restaurant}/guests")
    print(f"  tables     {http}/restaurants/{restaurant}/tables")
    if settings.token_secret is not None and not generated_secret:
        print(f"  tokens     python -m examples.restaurant_app token --restaurant {restaurant}")
    if settings.demo:
        header = f"-H 'authorization: Bearer {token}' " if token else ""
        body = '{"guestName": "John Doe", "partySize": 4}'
        if token:
            print(f"  token      {token}")
            hours = DEMO_TOKEN_TTL // 3600
            print(f"             (device 'demo-device', {restaurant!r} only, valid {hours} h)")
        if generated_secret:
            print(f"  secret     RESTAURANT_TOKEN_SECRET={settings.token_secret}")
            print("             (generated for this run; export it to keep tokens valid across restarts")
            print("             and to mint more with `python -m examples.restaurant_app token`)")
        print(f"  try        curl {header}{http}/restaurants/{restaurant}/tables")
        print(f"             curl -X POST {header}-H 'content-type: application/json' -d '{body}' \\")
        print(f"               {http}/restaurants/{restaurant}/guests")
    sys.stdout.flush()

    config = uvicorn.Config(app, host=args.host, port=args.port, **uvicorn_options(settings))
    # uvicorn has configured its loggers now: keep tokens in realtime URLs out of the logs.
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addFilter(RedactTokens())
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
