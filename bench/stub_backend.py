"""An OpenAI-shaped stub backend for bench/gateway.py: trio + h11, no framework, no model.

POST /v1/chat/completions answers after `--delay-s` (0: at once) with one fixed
chat.completion; with `"stream": true` in the body, `--chunks` chat.completion.chunk events
`--chunk-interval-s` apart, then `data: [DONE]`. Anything else is a 404 (the bench's
readiness check). Why not the demo backend: its simulated GPU costs CPU per request that
the proxies under test would have to share on a 2-core machine; this one costs as little
per request and per chunk as Python allows (the framed chunks are built once, and every
stream waits on one shared ticker instead of a timer of its own).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import h11
import trio

# run as a script (bench/rig.py): the repository's root on the path, for tests.support
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

from tests.support.h11_server import read_request  # noqa: E402

CREATED = 1_700_000_000
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": CREATED,
        "model": "stub",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }
).encode()
JSON_HEAD = [("content-type", "application/json"), ("content-length", str(len(COMPLETION)))]
SSE_HEAD = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]


def sse_event(content: str, finish_reason: str | None) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish_reason}
    chunk = {
        "id": "chatcmpl-stub",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "stub",
        "choices": [choice],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def framed(data: bytes) -> bytes:
    """`data` as one HTTP/1.1 chunk (written past h11, which only frames what it is sent)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass(frozen=True, slots=True)
class Stub:
    delay_s: float
    chunks: int
    chunk_interval_s: float
    chunk: bytes = framed(sse_event("tok", None))
    last: bytes = framed(sse_event("tok", "stop") + b"data: [DONE]\n\n")


class Ticker:
    """One timer for every stream: each waits for the next tick (`wait_tick`) rather than
    sleeping on a timer of its own (at 2,000 streams, 200,000 timers a second)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._tick = trio.Event()

    async def run(self) -> None:
        next_at = trio.current_time()
        while True:
            next_at += self.interval_s
            await trio.sleep_until(next_at)
            self._tick.set()
            self._tick = trio.Event()

    async def wait_tick(self) -> None:
        await self._tick.wait()


async def answer(
    conn: h11.Connection, stream: trio.SocketStream, stub: Stub, ticker: Ticker
) -> None:
    """Read one request and answer it; return when the connection is done with."""
    if (read := await read_request(conn, stream)) is None:  # the client closed
        return
    request, body = read
    if request.target != b"/v1/chat/completions":
        await stream.send_all(conn.send(h11.Response(status_code=404, headers=JSON_HEAD[:1])))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return
    if stub.delay_s > 0:
        await trio.sleep(stub.delay_s)
    if b'"stream": true' not in body and b'"stream":true' not in body:
        head = h11.Response(status_code=200, headers=JSON_HEAD)
        await stream.send_all(conn.send(head) + conn.send(h11.Data(data=COMPLETION)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return
    await stream.send_all(conn.send(h11.Response(status_code=200, headers=SSE_HEAD)))
    for _ in range(stub.chunks - 1):
        await ticker.wait_tick()
        await stream.send_all(stub.chunk)
    await ticker.wait_tick()
    await stream.send_all(stub.last + conn.send(h11.EndOfMessage()))


async def serve_connection(stub: Stub, ticker: Ticker, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            await answer(conn, stream, stub, ticker)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, h11.ProtocolError, OSError):
        return
    finally:
        await stream.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-s", type=float, default=0.0, help="before answering")
    parser.add_argument("--chunks", type=int, default=50, help="content events per stream")
    parser.add_argument("--chunk-interval-s", type=float, default=0.01)
    args = parser.parse_args()
    stub = Stub(args.delay_s, args.chunks, args.chunk_interval_s)
    trio.run(serve, stub, args.port)


async def serve(stub: Stub, port: int) -> None:
    ticker = Ticker(stub.chunk_interval_s)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        handler = partial(serve_connection, stub, ticker)
        await trio.serve_tcp(handler, port, host="127.0.0.1", backlog=4096)


if __name__ == "__main__":
    main()
