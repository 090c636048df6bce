"""A stream is bounded: by `server.request_timeout_s` as a whole, and by
`server.first_byte_timeout_s` until its first byte (issue 12, item 15).

Through the real gateway on loopback, in front of a tiny backend of this module's own that
never ends its streams (or never starts them). Each stream must end, within its bound, with an
OpenAI-shaped SSE error event; the gateway's in-flight count must return to 0 and the backend
must see its connection closed (nothing left holding a slot or a socket). The same holds
when the client is what ends the stream, with a reset (`SO_LINGER` 0) in the middle of it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import socket
import struct
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import h11
import httpx2
import pytest
import trio

from scheduler.service.config import ConfigError, load_settings
from tests.conftest import start_gateway
from tests.support.h11_server import read_request

REQUEST_TIMEOUT_S = 4.0
FIRST_BYTE_TIMEOUT_S = 0.5
# the gateway's own work on a shared, loaded 2-core machine (20 streams admitted at once);
# the first byte's still ends well before the request timeout
SLACK_S = 1.5
STREAMS_SLACK_S = 2.5
STREAMS = 20  # as in the report: 20 never-ending streams at once
KEY = "sk-stream-bounds"
CHAT = {
    "model": "endless",
    "messages": [{"role": "user", "content": "go on"}],
    "max_tokens": 8,
    "stream": True,
}
CONFIG = """
[server]
request_timeout_s = {timeout}
first_byte_timeout_s = {first_byte}

[redis]
prefix = "{prefix}"

[tiers.pro]
weight = 1
max_wait_s = 10
max_depth = 100

[[keys]]
key = "{key}"
tenant = "t"
tier = "pro"

[models.endless]
backends = ["{backend}"]
cache_fresh_s = 0
[models.endless.pressure]
enabled = false
"""
CHUNK = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "x"}}]}
EVENT = b"data: " + json.dumps(CHUNK).encode() + b"\n\n"
INFLIGHT_RE = re.compile(r"^scheduler_inflight ([0-9.e+-]+)$", re.M)


class Mode(enum.Enum):
    ENDLESS = "endless"  # the head, then an event every 0.1 s, forever
    NO_FIRST_BYTE = "no_first_byte"  # the head (200, text/event-stream), then nothing
    SILENT = "silent"  # reads the request, never answers


class EndlessBackend:
    """An OpenAI-ish backend whose streams never end; counts its open connections."""

    def __init__(self) -> None:
        self.mode = Mode.ENDLESS
        self.open = 0
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[EndlessBackend]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.open += 1
        try:
            conn = h11.Connection(h11.SERVER)
            if (read := await read_request(conn, stream)) is None:
                return
            request, _ = read
            if request.method != b"POST":  # probes: nothing to say
                await _send(conn, stream, h11.Response(status_code=404, headers=_close()))
                await _send(conn, stream, h11.EndOfMessage())
                return
            if self.mode is Mode.SILENT:
                await _wait_gone(stream)
                return
            head = [(b"content-type", b"text/event-stream"), *_close()]
            await _send(conn, stream, h11.Response(status_code=200, headers=head))
            if self.mode is Mode.NO_FIRST_BYTE:
                await _wait_gone(stream)
                return
            while True:  # bounded by the gateway: it closes the connection
                await _send(conn, stream, h11.Data(data=EVENT))
                await trio.sleep(0.1)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the gateway hung up: what the test waits for
        finally:
            self.open -= 1
            await stream.aclose()


def _close() -> list[tuple[bytes, bytes]]:
    return [(b"connection", b"close")]


async def _send(conn: h11.Connection, stream: trio.SocketStream, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _wait_gone(stream: trio.SocketStream) -> None:
    """Until the client closes its side (reads return b"")."""
    while await stream.receive_some(65_536):
        pass


@pytest.fixture
async def setup(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[str, EndlessBackend]]:
    backend = await nursery.start(EndlessBackend().run)
    path = tmp_path / "streams.toml"
    path.write_text(
        CONFIG.format(
            timeout=REQUEST_TIMEOUT_S,
            first_byte=FIRST_BYTE_TIMEOUT_S,
            prefix=f"stream-bounds-{uuid.uuid4().hex}",
            key=KEY,
            backend=f"http://127.0.0.1:{backend.port}",
        )
    )
    settings = load_settings(path, env={}, overrides={"port": 0})
    settings = dataclasses.replace(settings, redis_url=redis_url)
    yield await start_gateway(nursery, settings), backend


async def _stream(client: httpx2.AsyncClient, gateway: str) -> tuple[int, bytes, float]:
    """(status, whole body, seconds until it ended)."""
    started = trio.current_time()
    headers = {"authorization": f"Bearer {KEY}"}
    async with client.stream(
        "POST", gateway + "/v1/chat/completions", json=CHAT, headers=headers
    ) as r:
        body = b"".join([chunk async for chunk in r.aiter_bytes()])
        return r.status_code, body, trio.current_time() - started


def _last_event(body: bytes) -> dict[str, object]:
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data:")]
    last: dict[str, object] = json.loads(events[-1][5:])
    return last


async def _inflight(client: httpx2.AsyncClient, gateway: str) -> float:
    return float(INFLIGHT_RE.findall((await client.get(gateway + "/metrics")).text)[0])


async def _settled(client: httpx2.AsyncClient, gateway: str, backend: EndlessBackend) -> None:
    """In flight 0 at the gateway and no connection open at the backend, within 2 s."""
    with trio.fail_after(2):
        while await _inflight(client, gateway) != 0 or backend.open != 0:
            await trio.sleep(0.05)


def _assert_timeout_event(body: bytes) -> None:
    error = _last_event(body)["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error" and error["code"] == "timeout"


async def test_never_ending_streams_end_with_an_error_event_at_the_request_timeout(
    setup: tuple[str, EndlessBackend],
) -> None:
    gateway, backend = setup
    results: list[tuple[int, bytes, float]] = []
    async with httpx2.AsyncClient(timeout=30) as client:
        with trio.fail_after(REQUEST_TIMEOUT_S + 10):

            async def one() -> None:
                results.append(await _stream(client, gateway))

            async with trio.open_nursery() as streams:
                for _ in range(STREAMS):
                    streams.start_soon(one)
                with trio.fail_after(REQUEST_TIMEOUT_S):  # all admitted, each holding a slot
                    while await _inflight(client, gateway) != STREAMS:
                        await trio.sleep(0.05)
                assert backend.open == STREAMS
            await _settled(client, gateway, backend)
    assert len(results) == STREAMS
    took = sorted(r[2] for r in results)
    print(f"{STREAMS} endless streams ended after {took[0]:.2f}..{took[-1]:.2f} s")
    for status, body, took_s in results:
        assert status == 200
        assert body.count(b"data:") > 2  # it streamed, then was cut
        _assert_timeout_event(body)
        assert b"[DONE]" not in body
        assert REQUEST_TIMEOUT_S - 0.1 <= took_s <= REQUEST_TIMEOUT_S + STREAMS_SLACK_S, took_s


async def test_a_stream_whose_first_byte_never_comes_ends_at_the_first_byte_timeout(
    setup: tuple[str, EndlessBackend],
) -> None:
    gateway, backend = setup
    backend.mode = Mode.NO_FIRST_BYTE
    async with httpx2.AsyncClient(timeout=30) as client:
        with trio.fail_after(REQUEST_TIMEOUT_S + 10):
            status, body, took_s = await _stream(client, gateway)
            await _settled(client, gateway, backend)
    assert status == 200  # the head came: the error can only be an event
    _assert_timeout_event(body)
    assert body.count(b"data:") == 1
    assert FIRST_BYTE_TIMEOUT_S - 0.1 <= took_s <= FIRST_BYTE_TIMEOUT_S + SLACK_S, took_s


async def test_a_backend_that_never_answers_a_stream_is_a_504_at_the_first_byte_timeout(
    setup: tuple[str, EndlessBackend],
) -> None:
    gateway, backend = setup
    backend.mode = Mode.SILENT
    async with httpx2.AsyncClient(timeout=30) as client:
        with trio.fail_after(REQUEST_TIMEOUT_S + 10):
            status, body, took_s = await _stream(client, gateway)
            await _settled(client, gateway, backend)
    assert status == 504  # nothing sent yet: a plain OpenAI error
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "timeout"
    assert FIRST_BYTE_TIMEOUT_S - 0.1 <= took_s <= FIRST_BYTE_TIMEOUT_S + SLACK_S, took_s


async def test_clients_that_reset_mid_stream_free_their_seats_and_backend_calls(
    setup: tuple[str, EndlessBackend],
) -> None:
    gateway, backend = setup
    resets = 10
    request = json.dumps(CHAT).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(request)}\r\n\r\n"
    ).encode()

    async def stream_then_reset() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", int(gateway.rsplit(":", 1)[1]))
        linger_0 = struct.pack("ii", 1, 0)  # close with a reset, not a FIN
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_0)
        await stream.send_all(head + request)
        seen = b""
        while seen.count(b"data:") < 2:  # the head and two events: the stream is under way
            piece = await stream.receive_some(65_536)
            assert piece, seen
            seen += piece
        assert seen.startswith(b"HTTP/1.1 200"), seen
        await stream.aclose()

    async with httpx2.AsyncClient(timeout=30) as client:
        with trio.fail_after(REQUEST_TIMEOUT_S + 10):
            started = trio.current_time()
            async with trio.open_nursery() as clients:
                for _ in range(resets):
                    clients.start_soon(stream_then_reset)
            await _settled(client, gateway, backend)
            # freed by the resets, not by the request timeout that would end them anyway
            assert trio.current_time() - started < REQUEST_TIMEOUT_S - 0.5
            backend.mode = Mode.NO_FIRST_BYTE  # the gateway still serves: a short stream
            status, body, _ = await _stream(client, gateway)
    assert status == 200
    _assert_timeout_event(body)


@pytest.mark.parametrize("value", ["0", "-1.5", "inf", "nan", '"soon"'])
def test_the_first_byte_timeout_must_be_a_positive_number(tmp_path: Path, value: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[server]\nfirst_byte_timeout_s = {value}\n")
    with pytest.raises(ConfigError, match=r"server\.first_byte_timeout_s"):
        load_settings(path, env={})
