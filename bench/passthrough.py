"""An extra row of bench/gateway.py: the bare proxy's work (`bench/bare_proxy.py`), served by
quart-trio instead of a raw ASGI callable, so that the difference is the framework's cost."""

from __future__ import annotations

import argparse

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from backends.http.client import BackendLimits, HttpClient

HEADERS = {"content-type": "application/json"}


def create_app(upstream: str) -> QuartTrio:
    app = QuartTrio("passthrough")
    limits = BackendLimits(max_connections=4096)
    pool, target = HttpClient(limits).pool_for(upstream + "/v1/chat/completions")

    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        body = await request.get_data(as_text=False)
        assert isinstance(body, bytes)
        async with pool.stream("POST", target, HEADERS, body, 60.0) as r:
            status, content = r.status_code, await r.read()
        return Response(content, status=status, content_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    config.backlog = 1024
    config.keep_alive_timeout = 75
    trio.run(serve, create_app(args.upstream), config)


if __name__ == "__main__":
    main()
