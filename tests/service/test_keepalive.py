"""Keep-alive after an early answer: a response sent before the request's body was read must
leave the connection able to carry the next request (or close it), never hang it."""

from __future__ import annotations

import pytest
import trio

from backends import eager
from tests.conftest import gateway_settings, start_demo, start_gateway

KEY = "sk-demo-enterprise"
BODY = b'{"model": "demo-small", "messages": [{"role": "user", "content": "hi"}]}'
EARLY = [  # (method, path, headers): each is answered before its body is needed
    ("PUT", "/admin/v1/controller", ""),  # the admin API is off: 404
    ("POST", "/v1/chat/completions", ""),  # no key: 401
    ("POST", "/v1/chat/completions", "Authorization: Bearer sk-nope\r\n"),  # unknown key: 401
    ("POST", "/v2/nothing", ""),  # no such route: 404
    ("QUERY", "/v1/chat/completions", ""),  # wrong method: 405
    ("DELETE", "/v1/models", ""),  # wrong method: 405
]


@pytest.fixture
async def gateway_port(nursery: trio.Nursery, redis_url: str) -> int:
    demo = await start_demo(nursery)
    url = await start_gateway(nursery, gateway_settings(demo, redis_url))
    return int(url.rsplit(":", 1)[1])


async def read_response(stream: trio.SocketStream, buffer: bytearray) -> tuple[bytes, bytes]:
    """One whole final response (status line and headers, body by Content-Length) off
    `stream`; interim 1xx responses are skipped, as every HTTP/1.1 client does."""
    while True:
        while b"\r\n\r\n" not in buffer:
            data = await stream.receive_some(65536)
            assert data, f"the connection closed; got {bytes(buffer)!r}"
            buffer += data
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 1"):
            break
        buffer[:] = rest
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        data = await stream.receive_some(65536)
        assert data, "the connection closed mid-body"
        rest += data
    buffer[:] = rest[length:]
    return head, rest[:length]


@pytest.mark.parametrize(("method", "path", "extra"), EARLY)
@pytest.mark.parametrize("body_later", [False, True])
async def test_the_next_request_after_an_early_answer_is_answered(
    gateway_port: int, method: str, path: str, extra: str, body_later: bool
) -> None:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"{extra}Content-Length: {len(BODY)}\r\n\r\n"
    ).encode()
    buffer = bytearray()
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", gateway_port)
        async with stream:
            for _ in range(2):  # twice, as a client library's retry would
                await stream.send_all(head)
                if body_later:
                    await trio.sleep(0.05)  # the early answer is ready before the body comes
                await stream.send_all(BODY)
                status, body = await read_response(stream, buffer)
                assert status.split(b" ")[1] in (b"401", b"404", b"405"), status
                assert body.startswith(b'{"error": ')
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            status, body = await read_response(stream, buffer)
            assert status.startswith(b"HTTP/1.1 200"), status


async def test_a_body_over_the_limit_is_answered_413_and_closes(gateway_port: int) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Length: 99999999\r\n\r\n"
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", gateway_port)
        async with stream:
            await stream.send_all(head + b"x" * 1000)
            status, body = await read_response(stream, bytearray())
            while await stream.receive_some(65536):  # then the gateway closes it
                pass
    assert status.startswith(b"HTTP/1.1 413") and b"connection: close" in status.lower()
    assert body.startswith(b'{"error": ')


async def test_content_length_and_transfer_encoding_together_are_refused_and_closed(
    gateway_port: int,
) -> None:
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n"
    )
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", gateway_port)
        async with stream:
            await stream.send_all(request)
            status, body = await read_response(stream, bytearray())
            assert status.startswith(b"HTTP/1.1 400") and b"connection: close" in status.lower()
            assert body.startswith(b'{"error": ')
            while await stream.receive_some(65536):  # then the gateway closes it
                pass


@pytest.mark.parametrize(
    "head",
    [
        b"GET /v1/models HTTP/1.1\nHost: g\r\n\r\n",  # after the request line
        b"GET /v1/models HTTP/1.1\r\nHost: g\nX-Hidden: 1\r\n\r\n",  # between headers
        b"GET /v1/models HTTP/1.1\r\nHost: g\r\n\n",  # the blank line
    ],
)
async def test_a_bare_lf_in_the_request_head_is_refused_and_closed(
    gateway_port: int, head: bytes
) -> None:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", gateway_port)
        async with stream:
            await stream.send_all(head)
            status, body = await read_response(stream, bytearray())
            assert status.startswith(b"HTTP/1.1 400") and b"connection: close" in status.lower()
            assert body.startswith(b'{"error": ')
            while await stream.receive_some(65536):  # then the gateway closes it
                pass


async def test_a_bare_lf_inside_a_body_is_only_data(gateway_port: int) -> None:
    body = b'{"model": "demo-small",\n"messages": [{"role": "user", "content": "a\\nb"}]}'
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", gateway_port)
        async with stream:
            await stream.send_all(request)
            status, _ = await read_response(stream, bytearray())
    assert status.startswith(b"HTTP/1.1 401")  # no key: the body was read as a body


@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions"])
async def test_a_client_that_half_closes_after_its_request_gets_the_answer(
    gateway_port: int, path: str
) -> None:
    """`shutdown(SHUT_WR)` once the request is sent (as `nc -N` does): the answer still comes,
    then the gateway closes the connection."""
    method = b"GET" if path == "/v1/models" else b"POST"
    request = (
        b"%s %s HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % (method, path.encode(), KEY.encode(), len(BODY))
    ) + BODY
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", gateway_port)
        async with stream:
            await stream.send_all(request)
            await stream.send_eof()
            status, body = await read_response(stream, bytearray())
            while await stream.receive_some(65536):  # then the gateway closes it
                pass
    assert status.startswith(b"HTTP/1.1 200"), status + body
    assert b'"object": ' in body


async def test_a_whole_answer_is_one_write(
    gateway_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Head and body of an answer framed by Content-Length leave in one socket write (not
    head, body and an empty end: three writes under the connection's send lock), on a
    connection that then carries the next request; a stream's head still goes at once."""
    writes: list[tuple[int, bytes]] = []  # (the client's port, the data) for the client's
    send_all = trio.SocketStream.send_all

    async def counted(self: trio.SocketStream, data: bytes | bytearray | memoryview) -> None:
        if self.socket.getsockname()[1] == gateway_port:
            writes.append((self.socket.getpeername()[1], bytes(data)))
        await send_all(self, data)

    write_nowait = eager.write_nowait

    def counted_nowait(stream: trio.SocketStream, data: bytes) -> int:
        sent = write_nowait(stream, data)
        if stream.socket.getsockname()[1] == gateway_port:  # (a partial write: the rest
            writes.append((stream.socket.getpeername()[1], bytes(data[:sent])))  # follows)
        return sent

    monkeypatch.setattr(trio.SocketStream, "send_all", counted)
    monkeypatch.setattr(eager, "write_nowait", counted_nowait)  # the write without a yield
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n%s"
    )
    stream_body = BODY[:-1] + b', "stream": true}'
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", gateway_port)
        port = stream.socket.getsockname()[1]
        buffer = bytearray()
        for _ in range(2):
            await stream.send_all(request % (len(BODY), BODY))
            head, body = await read_response(stream, buffer)
            assert head.startswith(b"HTTP/1.1 200"), head
        mine = [data for p, data in writes if p == port]
        assert len(mine) == 2, [len(d) for d in mine]  # one per answer
        assert all(data.endswith(body[-20:]) and b"\r\n\r\n" in data for data in mine)
        writes.clear()
        await stream.send_all(request % (len(stream_body), stream_body))
        while b"0\r\n\r\n" not in buffer:  # the chunked stream's end
            buffer += await stream.receive_some(65536)
        await stream.aclose()
    mine = [data for p, data in writes if p == port]
    assert mine[0].startswith(b"HTTP/1.1 200") and mine[0].endswith(b"\r\n\r\n")  # the head
    assert len(mine) > 2  # then the events as they come
