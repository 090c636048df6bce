"""The baseline for bench/gateway.py: a bare quart-trio + httpx2 passthrough of the same
request to the same backend, with none of the gateway's work (no auth, no queue, no gate)."""

from __future__ import annotations

import argparse

import httpx2
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio


def create_app(upstream: str) -> QuartTrio:
    app = QuartTrio("passthrough")
    client = httpx2.AsyncClient(
        limits=httpx2.Limits(max_connections=512, max_keepalive_connections=512), timeout=60
    )

    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        body = await request.get_data(as_text=False)
        assert isinstance(body, bytes)
        r = await client.post(
            upstream + "/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
        )
        return Response(r.content, status=r.status_code, content_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    trio.run(serve, create_app(args.upstream), config)


if __name__ == "__main__":
    main()
