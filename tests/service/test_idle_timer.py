"""hypercorn as `scheduler/service/http1.py` changes it, on a real socket, with a small ASGI
app: the keep-alive timer (one task per connection whose deadline moves, `_IdleTimer`) and
the write made without a yield when the socket takes it (`backends.eager.write_nowait`)."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from scheduler.service import http1

KEEP_ALIVE_S = 0.5
BIG = 8 * 1024 * 1024  # far more than a socket's buffer: the write cannot go at once


async def app(scope: Any, receive: Any, send: Any) -> None:
    """`/sleep/S`: answers after S seconds; `/big`: BIG bytes; else a small answer."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    path: str = scope["path"]
    if path.startswith("/sleep/"):
        await trio.sleep(float(path.rsplit("/", 1)[1]))
    body = b"x" * BIG if path == "/big" else b"ok"
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Server:
    def __init__(self, port: int, stop: trio.Event) -> None:
        self.port, self.stop = port, stop


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[Server]:
    http1.install()
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn's to close
    config.keep_alive_timeout = KEEP_ALIVE_S
    config.graceful_timeout = 5.0
    config.accesslog = None
    stop = trio.Event()
    nursery.start_soon(lambda: serve(app, config, shutdown_trigger=stop.wait))
    yield Server(port, stop)
    stop.set()


async def ask(stream: trio.SocketStream, path: str) -> bytes:
    """One request on `stream`, its whole answer's body."""
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        piece = await stream.receive_some(65536)
        assert piece, "closed mid-answer"
        body += piece
    return body


async def closed_after(stream: trio.SocketStream) -> float:
    """Seconds until the server closes `stream`."""
    started = trio.current_time()
    assert await stream.receive_some(65536) == b""
    return trio.current_time() - started


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(server: Server) -> None:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        assert await ask(stream, "/") == b"ok"
        assert KEEP_ALIVE_S * 0.8 <= await closed_after(stream) <= KEEP_ALIVE_S + 1.0


async def test_the_timer_counts_from_the_last_answer(server: Server) -> None:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        for _ in range(3):  # each answer moves the deadline: 3 x 0.3 s idle is more than 0.5 s
            assert await ask(stream, "/") == b"ok"
            await trio.sleep(KEEP_ALIVE_S * 0.6)
        assert await ask(stream, "/") == b"ok"
        assert KEEP_ALIVE_S * 0.8 <= await closed_after(stream) <= KEEP_ALIVE_S + 1.0


async def test_a_request_longer_than_the_timeout_is_answered(server: Server) -> None:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        assert await ask(stream, f"/sleep/{KEEP_ALIVE_S * 3}") == b"ok"  # busy: no timer
        assert await ask(stream, "/") == b"ok"  # and the connection still carries the next
        assert KEEP_ALIVE_S * 0.8 <= await closed_after(stream) <= KEEP_ALIVE_S + 1.0


async def test_shutting_down_closes_idle_connections_at_once_and_busy_ones_once_answered(
    server: Server,
) -> None:
    with trio.fail_after(10):
        idle = await trio.open_tcp_stream("127.0.0.1", server.port)
        assert await ask(idle, "/") == b"ok"
        busy = await trio.open_tcp_stream("127.0.0.1", server.port)
        await busy.send_all(b"GET /sleep/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        await trio.sleep(0.2)
        server.stop.set()
        assert await closed_after(idle) < KEEP_ALIVE_S * 0.5
        answer = b""
        while piece := await busy.receive_some(65536):
            answer += piece
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")


async def test_an_answer_larger_than_the_socket_buffer_arrives_whole(server: Server) -> None:
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await trio.sleep(0.3)  # the server's write fills the buffers and waits for the rest
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        body = data.partition(b"\r\n\r\n")[2]
        while len(body) < BIG:
            body += await stream.receive_some(65536)
        assert body == b"x" * BIG
        assert await ask(stream, "/") == b"ok"  # the connection is still good


async def test_a_client_gone_mid_write_ends_its_connection_only(server: Server) -> None:
    with trio.fail_after(20):
        gone = await trio.open_tcp_stream("127.0.0.1", server.port)
        linger_0 = struct.pack("ii", 1, 0)  # close with a reset, not a FIN
        gone.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_0)
        await gone.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await trio.sleep(0.2)
        await gone.aclose()  # a reset, with the server's write under way
        await trio.sleep(0.2)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        assert await ask(stream, "/") == b"ok"
