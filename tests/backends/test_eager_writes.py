"""What a round trip costs its task in trio task steps (each step waits for every other
runnable task: with hundreds of requests moving together, a turn of a long queue). A write
the socket takes whole makes none (`backends.eager`): a Redis round trip of the pipeliner's
own connection, and a request to a backend on a kept-alive connection, are each one step,
the wait for the answer."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import coredis
import h11
import pytest
import trio

from backends.eager import send_all_eagerly, write_nowait
from backends.http.client import BackendLimits, HttpClient
from backends.redis.resp import RespConnection
from tests.support.h11_server import read_request

DEADLINE_S = 10.0


class StepsOf(trio.abc.Instrument):
    """Task steps of one task."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def steps_of(call: Callable[[], Awaitable[Any]]) -> tuple[int, Any]:
    """How many times the current task is resumed while `call` runs, and its result."""
    instrument = StepsOf(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(instrument)
    try:
        result = await call()
    finally:
        trio.lowlevel.remove_instrument(instrument)
    return instrument.steps, result


async def test_a_redis_round_trip_is_one_step_of_its_task(redis_url: str) -> None:
    redis: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
    connection = RespConnection.for_client(redis)
    assert connection is not None
    with trio.fail_after(DEADLINE_S):
        try:
            await connection.round_trip([(b"PING",)])  # connected, out of the count
            steps, replies = await steps_of(
                partial(connection.round_trip, [(b"PING",), (b"ECHO", b"x")])
            )
        finally:
            await connection.aclose()
    assert replies == [b"PONG", b"x"]
    assert steps == 1  # the wait for the replies; the write made none


async def serve_ok(stream: trio.SocketStream) -> None:
    """Every request answered with a 200 in one write, on one kept-alive connection."""
    conn = h11.Connection(h11.SERVER)
    while await read_request(conn, stream) is not None:
        head = h11.Response(status_code=200, headers=[("content-length", "2")])
        out = conn.send(head) + conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage())
        await stream.send_all(out)
        conn.start_next_cycle()


@asynccontextmanager
async def ok_server() -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve_ok, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/v1"
        nursery.cancel_scope.cancel()


async def test_a_request_on_a_kept_alive_connection_is_one_step_of_its_task() -> None:
    client = HttpClient(BackendLimits())
    with trio.fail_after(DEADLINE_S):
        async with ok_server() as url:
            await client.request("POST", url, body=b"{}", timeout_s=5)  # connected
            steps, answer = await steps_of(
                partial(client.request, "POST", url, body=b"{}", timeout_s=5)
            )
    client.close()
    assert answer == (200, b"ok")
    assert steps == 1  # the wait for the answer; the request's write made none


async def test_a_cancelled_task_writes_nothing() -> None:
    a, b = socket.socketpair()
    b.setblocking(False)
    with a, b:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
        with trio.CancelScope() as scope:
            scope.cancel()
            await send_all_eagerly(stream, b"never")
        assert scope.cancelled_caught
        with pytest.raises(BlockingIOError):
            b.recv(16)  # nothing arrived


async def test_what_the_socket_does_not_take_at_once_is_sent_too() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        stream = trio.SocketStream(a)
        data = bytes(range(256)) * 40_000  # 10 MB: far more than a socket buffer holds
        received = bytearray()

        async def read() -> None:
            while len(received) < len(data):
                received.extend(await b.recv(1 << 20))

        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await send_all_eagerly(stream, data)
        assert bytes(received) == data


async def test_write_nowait_takes_what_the_buffer_holds_and_then_nothing() -> None:
    """The part both `send_all_eagerly` and the gateway's client writes (http1) rely on: a
    partial count from a filling buffer, 0 from a full one, never a BlockingIOError."""
    a, b = trio.socket.socketpair()
    with a, b:
        stream = trio.SocketStream(a)
        data = b"x" * 10_000_000  # far more than a socket buffer holds
        taken = write_nowait(stream, data)
        assert 0 < taken < len(data)
        assert write_nowait(stream, data) == 0


async def test_write_nowait_raises_the_oserror_of_a_broken_connection() -> None:
    a, b = trio.socket.socketpair()
    with a:
        b.close()  # the peer gone: EPIPE (Python ignores SIGPIPE)
        with pytest.raises(OSError):
            write_nowait(trio.SocketStream(a), b"late")
