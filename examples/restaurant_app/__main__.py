"""``python -m examples.restaurant_app``: run the service with uvicorn."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

import uvicorn
from sqlalchemy.engine import make_url

from .app import DEMO_RESTAURANT_ID, create_app
from .config import Settings


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, print where the service listens, and serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.restaurant_app",
        description="Run the rtbroadcast example restaurant service (configuration: see README.md).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument(
        "--demo", action="store_true", help=f"seed the demo restaurant {DEMO_RESTAURANT_ID!r} with tables"
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        parser.error(str(exc))
    if args.demo:
        settings = dataclasses.replace(settings, demo=True)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    app = create_app(settings)
    http = f"http://{args.host}:{args.port}"
    ws = f"ws://{args.host}:{args.port}"
    database = make_url(settings.database_url).render_as_string(hide_password=True)
    print(f"rtbroadcast restaurant service on {http}")
    print(f"  database   {database}")
    print(f"  broadcast  {settings.broadcast_url.split('://', 1)[0]}://")
    print(f"  API docs   {http}/docs")
    print(f"  health     {http}/health")
    restaurant = DEMO_RESTAURANT_ID if settings.demo else "<restaurant_id>"
    print(f"  realtime   {ws}/realtime?restaurant_id={restaurant}")
    print(f"  guests     {http}/restaurants/{restaurant}/guests")
    print(f"  tables     {http}/restaurants/{restaurant}/tables")
    if settings.demo:
        body = '{"guestName": "John Doe", "partySize": 4}'
        print(f"  try        curl -X POST -H 'content-type: application/json' -d '{body}' \\")
        print(f"               {http}/restaurants/{restaurant}/guests")
    sys.stdout.flush()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        ws_ping_interval=settings.heartbeat_interval,
        ws_ping_timeout=settings.heartbeat_timeout,
    )


if __name__ == "__main__":
    main()
