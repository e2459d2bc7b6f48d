"""``python -m bench.servers STACK --port N [--http-port M] [--redis-url URL]``: run one server."""

from __future__ import annotations

import argparse

STACKS = (
    "raw-websockets",
    "naive-starlette",
    "broadcaster-memory",
    "broadcaster-redis",
    "rtbroadcast-memory",
    "rtbroadcast-redis",
    "rtbroadcast-cluster",
    "rtbroadcast-deflate",
)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.servers", description=__doc__)
    parser.add_argument("stack", choices=STACKS)
    parser.add_argument("--port", type=int, required=True, help="WebSocket (and HTTP) port")
    parser.add_argument("--http-port", type=int, help="publish port of raw-websockets")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--cluster-url", help="redis+cluster:// URL of rtbroadcast-cluster")
    args = parser.parse_args()

    if args.stack == "raw-websockets":
        from .raw_websockets import run

        if args.http_port is None:
            parser.error("raw-websockets needs --http-port")
        run(args.port, args.http_port)
        return

    from .common import run_uvicorn

    backend_url = args.redis_url if args.stack.endswith("-redis") else "memory://"
    if args.stack == "rtbroadcast-cluster":
        if not args.cluster_url:
            parser.error("rtbroadcast-cluster needs --cluster-url")
        backend_url = args.cluster_url
    if args.stack == "naive-starlette":
        from .naive_starlette import app

        run_uvicorn(app, args.port)
    elif args.stack.startswith("broadcaster-"):
        from .broadcaster_app import make_app

        run_uvicorn(make_app(backend_url), args.port)
    else:
        from .rtbroadcast_app import DEFLATE_OVERRIDES, UVICORN_OVERRIDES
        from .rtbroadcast_app import make_app as make_rtbroadcast_app

        overrides = DEFLATE_OVERRIDES if args.stack == "rtbroadcast-deflate" else UVICORN_OVERRIDES
        run_uvicorn(make_rtbroadcast_app(backend_url), args.port, **overrides)


if __name__ == "__main__":
    main()
