"""The baseline of bench/gateway.py: the bare proxy, the ceiling of the gateway's stack.

hypercorn's trio worker serving a raw ASGI callable (no framework) that forwards
POST /v1/chat/completions whole to one backend through the gateway's own HTTP client
(`backends/http/client.py`); nothing else (no auth, no queue, no quota, no metrics).
Whatever the gateway does on top of this is the gateway's own cost.
"""

from __future__ import annotations

import argparse
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from backends.http.client import BackendError, BackendLimits, HttpClient

Scope = dict[str, Any]
Receive = Any
Send = Any
HEADERS = {"content-type": "application/json"}


def create_app(upstream: str) -> Any:
    pool, target = HttpClient(BackendLimits(max_connections=4096)).pool_for(
        upstream + "/v1/chat/completions"
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: nothing to start or stop
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] != "/v1/chat/completions" or scope["method"] != "POST":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            async with pool.stream("POST", target, HEADERS, body, 60.0) as response:
                status, content = response.status_code, await response.read()
        except BackendError:
            status, content = 502, b"{}"
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.worker_class = "trio"
    config.accesslog = None
    config.backlog = 1024
    config.keep_alive_timeout = 75
    trio.run(serve, create_app(args.upstream), config)


if __name__ == "__main__":
    main()
