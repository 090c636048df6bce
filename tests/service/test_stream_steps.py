"""What a streamed chunk costs the gateway in trio task steps (each step of a task waits for
every other runnable task: at 2,000 streams, a step is a turn of a long queue). A chunk is
one step of the request's task: the wait for the backend's next bytes; its write to the
client makes none when the socket takes it (`scheduler/service/http1.py`)."""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from typing import Any

import h11
import trio

from tests.conftest import gateway_settings, start_gateway
from tests.support.h11_server import read_request

KEY = "sk-demo-enterprise"
EVENTS = 40
EVENT_INTERVAL_S = 0.01  # far apart enough that each event is a read of its own


async def serve_stream(stream: trio.SocketStream) -> None:
    """A backend: any GET is a 200 (the probes), a POST a stream of EVENTS events."""
    conn = h11.Connection(h11.SERVER)
    while (read := await read_request(conn, stream)) is not None:
        event, _ = read
        if event.method == b"GET":
            body = b'{"object": "list", "data": []}'
            head = [("content-type", "application/json"), ("content-length", str(len(body)))]
            out = conn.send(h11.Response(status_code=200, headers=head)) or b""
            await stream.send_all(out + (conn.send(h11.Data(data=body)) or b""))
        else:
            head = [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")]
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=head)) or b"")
            for i in range(EVENTS):
                chunk = {
                    "object": "chat.completion.chunk",
                    "choices": [
                        {"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}
                    ],
                }
                event_bytes = b"data: " + json.dumps(chunk).encode() + b"\n\n"
                await stream.send_all(conn.send(h11.Data(data=event_bytes)) or b"")
                await trio.sleep(EVENT_INTERVAL_S)
            await stream.send_all(conn.send(h11.Data(data=b"data: [DONE]\n\n")) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        conn.start_next_cycle()


class StepsOfRequestTasks(trio.abc.Instrument):
    """Task steps of hypercorn's request tasks (an ASGI app's `_handle`), per task."""

    def __init__(self) -> None:
        self.steps: Counter[trio.lowlevel.Task] = Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("task_group._handle"):
            self.steps[task] += 1


async def test_a_streamed_chunk_costs_the_request_task_one_step(
    nursery: trio.Nursery, redis_url: str
) -> None:
    listeners = await nursery.start(partial(trio.serve_tcp, serve_stream, 0, host="127.0.0.1"))
    backend = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    gateway = await start_gateway(nursery, gateway_settings(backend, redis_url))
    port = int(gateway.rsplit(":", 1)[1])
    body = json.dumps(
        {"model": "demo-small", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    instrument = StepsOfRequestTasks()
    with trio.fail_after(20):
        client = await trio.open_tcp_stream("127.0.0.1", port)
        trio.lowlevel.add_instrument(instrument)
        try:
            await client.send_all(request)
            answer = b""
            while not answer.endswith(b"0\r\n\r\n"):
                answer += await client.receive_some(65536)
            await trio.sleep(0.2)  # the request's task ends
        finally:
            trio.lowlevel.remove_instrument(instrument)
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"data: {") == EVENTS
    steps: dict[Any, int] = dict(instrument.steps)
    assert len(steps) == 1, steps  # the one request
    (count,) = steps.values()
    # one per event, and a few for the request itself (two per event before)
    assert EVENTS <= count <= EVENTS + 12, count
