"""The baselines for bench/gateway.py: a bare quart-trio passthrough of the same request to
the same backend, with none of the gateway's work (no auth, no queue, no gate), through
httpx2 (the issue's baseline) or through the gateway's own client (`--client h11`: what is
left is the gateway's own cost)."""

from __future__ import annotations

import argparse

import httpx2
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from backends.http.client import BackendLimits, HttpClient

HEADERS = {"content-type": "application/json"}


def create_app(upstream: str, client_name: str) -> QuartTrio:
    app = QuartTrio("passthrough")
    url = upstream + "/v1/chat/completions"
    client = httpx2.AsyncClient(
        limits=httpx2.Limits(max_connections=512, max_keepalive_connections=512), timeout=60
    )
    pool, target = HttpClient(BackendLimits()).pool_for(url)

    async def with_httpx2(body: bytes) -> tuple[int, bytes]:
        r = await client.post(url, content=body, headers=HEADERS)
        return r.status_code, r.content

    async def with_h11(body: bytes) -> tuple[int, bytes]:
        async with pool.stream("POST", target, HEADERS, body, 60.0) as r:
            return r.status_code, await r.read()

    call = with_h11 if client_name == "h11" else with_httpx2

    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        body = await request.get_data(as_text=False)
        assert isinstance(body, bytes)
        status, content = await call(body)
        return Response(content, status=status, content_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--client", choices=["httpx2", "h11"], default="httpx2")
    args = parser.parse_args()
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    trio.run(serve, create_app(args.upstream, args.client), config)


if __name__ == "__main__":
    main()
