"""The trio + h11 client against real servers on loopback: a scripted HTTP/1.1 server whose
every connection and request is recorded, the demo backend, and the demo backend over TLS."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from functools import partial

import h11
import pytest
import trio
import trustme
from hypercorn.trio import serve

from backends.demo.server import (
    DemoConfig,
    create_demo_app,
    hypercorn_config,
    serve_demo_backend,
)
from backends.http.client import (
    BackendBroken,
    BackendLimits,
    BackendTimeout,
    BackendUnavailable,
    HttpClient,
)
from backends.http.pool import BackendPool, HttpBackend
from tests.support.h11_server import read_request

CHAT = json.dumps({"model": "demo-small", "messages": [{"role": "user", "content": "hi"}]})

# What the scripted server does with the n-th request (from 1) on one connection.
Script = Callable[[int, trio.SocketStream, h11.Connection], Awaitable[bool]]


@dataclass
class Recorder:
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed_by_client: int = 0


async def answer(stream: trio.SocketStream, conn: h11.Connection, body: bytes = b"ok") -> None:
    head = h11.Response(status_code=200, headers=[("content-length", str(len(body)))])
    await stream.send_all(
        conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    )


async def always_answer(n: int, stream: trio.SocketStream, conn: h11.Connection) -> bool:
    await answer(stream, conn)
    return True


@asynccontextmanager
async def scripted_server(script: Script = always_answer) -> AsyncIterator[tuple[str, Recorder]]:
    """An HTTP/1.1 server on loopback; `script` answers (or not) and says whether to go on."""
    seen = Recorder()

    async def handle(stream: trio.SocketStream) -> None:
        seen.connections += 1
        seen.open_now += 1
        seen.most_open = max(seen.most_open, seen.open_now)
        conn = h11.Connection(h11.SERVER)
        try:
            for n in range(1, 1000):
                if (read := await read_request(conn, stream)) is None:
                    seen.closed_by_client += 1
                    return
                seen.requests.append(read[1])
                if not await script(n, stream, conn):
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            seen.closed_by_client += 1
        finally:
            seen.open_now -= 1
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}", seen
        nursery.cancel_scope.cancel()


def client(**limits: float) -> HttpClient:
    return HttpClient(BackendLimits(**limits))  # type: ignore[arg-type]


async def post(http: HttpClient, url: str, body: bytes = b"x") -> tuple[int, bytes]:
    return await http.request("POST", url, body=body, timeout_s=5.0)


async def test_requests_in_turn_share_one_keep_alive_connection() -> None:
    with trio.fail_after(10), closing(client()) as http:
        async with scripted_server() as (url, seen):
            for i in range(20):
                assert await post(http, url + "/v1/x", str(i).encode()) == (200, b"ok")
    assert seen.connections == 1
    assert seen.requests == [str(i).encode() for i in range(20)]


async def test_at_most_max_connections_are_open_at_once() -> None:
    async def slow(n: int, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        await trio.sleep(0.05)
        await answer(stream, conn)
        return True

    with trio.fail_after(10), closing(client(max_connections=3)) as http:
        async with scripted_server(slow) as (url, seen), trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(post, http, url)
    assert len(seen.requests) == 12
    assert seen.most_open == 3


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async def one_each(n: int, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        await answer(stream, conn)  # keep-alive promised, then closed anyway
        return False

    with trio.fail_after(10), closing(client()) as http:
        async with scripted_server(one_each) as (url, seen):
            for _ in range(3):
                with trio.fail_after(2):
                    while seen.open_now:  # the server has closed its side
                        await trio.sleep(0.01)
                assert await post(http, url) == (200, b"ok")
    assert (seen.connections, len(seen.requests)) == (3, 3)


async def test_a_reused_connection_that_dies_before_answering_is_retried_once() -> None:
    """The keep-alive race: the server drops a reused connection instead of answering. The
    request goes again on a new connection; on a new connection the same failure is final."""

    async def drop_second(n: int, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        if n == 2:
            return False  # close without an answer
        await answer(stream, conn)
        return True

    with trio.fail_after(10), closing(client()) as http:
        async with scripted_server(drop_second) as (url, seen):
            assert await post(http, url, b"a") == (200, b"ok")
            assert await post(http, url, b"b") == (200, b"ok")
            assert seen.requests == [b"a", b"b", b"b"]
            assert seen.connections == 2

    async def never_answer(n: int, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        return False

    with trio.fail_after(10), closing(client()) as http:
        async with scripted_server(never_answer) as (url, seen):
            with pytest.raises(BackendBroken):
                await post(http, url)
    assert seen.connections == 1


async def test_a_reused_connection_that_dies_late_is_not_sent_again() -> None:
    """A backend that worked on the request for a while and then died is not asked twice."""

    async def die_late(n: int, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        if n == 2:
            await trio.sleep(0.3)  # longer than the retry window: not the keep-alive race
            return False
        await answer(stream, conn)
        return True

    with trio.fail_after(10), closing(client(retry_window_s=0.1)) as http:
        async with scripted_server(die_late) as (url, seen):
            assert await post(http, url, b"a") == (200, b"ok")
            with pytest.raises(BackendBroken):
                await post(http, url, b"b")
    assert (seen.requests, seen.connections) == ([b"a", b"b"], 1)


async def test_a_response_left_half_read_closes_its_connection() -> None:
    """How a client that goes away mid-stream closes the upstream call."""

    ended: list[bytes] = []

    async def long_body(n: int, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        head = h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")])
        await stream.send_all(conn.send(head) + conn.send(h11.Data(data=b"first")))
        ended.append(await stream.receive_some(1))  # b"": the client closed the connection
        return False

    with trio.fail_after(10), closing(client()) as http:
        async with scripted_server(long_body) as (url, seen):
            pool, target = http.pool_for(url)
            async with pool.stream("POST", target, {}, b"x", 5.0) as response:
                async for chunk in response.chunks():
                    assert chunk == b"first"
                    break
            with trio.fail_after(2):
                while seen.open_now:
                    await trio.sleep(0.01)
            assert ended == [b""]


async def test_idle_connections_expire_after_keepalive_s() -> None:
    with trio.fail_after(10), closing(client(keepalive_s=0.1)) as http:
        async with scripted_server() as (url, seen):
            await post(http, url)
            await trio.sleep(0.15)  # longer than keepalive_s: expired, whatever the timing
            await post(http, url)
            await post(http, url)
    assert seen.connections == 2


async def test_failures_are_split_by_what_went_wrong() -> None:
    async def silent(n: int, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        await trio.sleep_forever()
        return False  # pragma: no cover

    async def garbage(n: int, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        await stream.send_all(b"this is not HTTP\r\n\r\n")
        return False

    with trio.fail_after(10), closing(client()) as http:
        with trio.socket.socket() as sock:
            await sock.bind(("127.0.0.1", 0))
            closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(BackendUnavailable):
            await post(http, closed)
        async with scripted_server(silent) as (url, _):
            pool, target = http.pool_for(url)
            with pytest.raises(BackendTimeout):
                async with pool.stream("POST", target, {}, b"x", 0.2):
                    pass
        async with scripted_server(garbage) as (url, _):
            with pytest.raises(BackendBroken):
                await post(http, url)


async def test_a_pool_moves_past_a_dead_backend_and_ejects_it(nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_demo_backend, DemoConfig())
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with trio.fail_after(10), closing(client()) as http:
        live = HttpBackend(f"http://127.0.0.1:{port}", http)
        gone = HttpBackend(dead, http)
        pool = BackendPool([gone, live])
        headers = {"content-type": "application/json"}
        async with pool.post("/v1/chat/completions", CHAT.encode(), headers) as response:
            assert response.status_code == 200
            assert json.loads(await response.read())["object"] == "chat.completion"
        assert (gone.healthy, live.healthy) == (False, True)
        assert not pool.in_rotation(dead + "/") and pool.in_rotation(live.url)
        assert pool.in_rotation("dcgm-exporter")  # not one of its backends
        assert not await gone.probe()
        assert await live.probe()


def answering(status: int) -> Script:
    async def script(n: int, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        head = h11.Response(status_code=status, headers=[("content-length", "0")])
        await stream.send_all(conn.send(head) + conn.send(h11.EndOfMessage()))
        return True

    return script


@pytest.mark.parametrize(("status", "back"), [(200, True), (404, True), (401, True), (503, False)])
async def test_an_ejected_backend_comes_back_once_it_answers_below_500(
    status: int, back: bool
) -> None:
    # Ejection means "cannot connect"; a server that connects and answers its /v1/models
    # probe with anything but a server error is up: one without that route (a 404) or behind
    # a key the gateway lacks (a 401, which requests then report as a 502 backend_auth) must
    # not stay out for good. A 503 (llama-server loading its model) is not up yet.
    with trio.fail_after(10), closing(client()) as http:
        async with scripted_server(answering(status)) as (url, seen):
            backend = HttpBackend(url, http)
            backend.eject("it could not be connected to")
            assert await backend.probe() is back
            assert backend.healthy is back and len(seen.requests) == 1


async def test_https_backends_are_verified_and_spoken_to_over_tls(nursery: trio.Nursery) -> None:
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    config = hypercorn_config("127.0.0.1", 0)
    with cert.private_key_pem.tempfile() as key, cert.cert_chain_pems[0].tempfile() as chain:
        config.certfile, config.keyfile = chain, key
        binds = await nursery.start(serve, create_demo_app(DemoConfig()), config)
    url = f"https://127.0.0.1:{binds[0].rsplit(':', 1)[1]}"
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    with trio.fail_after(10), closing(HttpClient(BackendLimits(), trusting)) as http:
        for _ in range(2):  # the second over the kept-alive TLS connection
            status, body = await http.get(url + "/v1/models", timeout_s=5)
            assert status == 200 and b"demo-small" in body
    with trio.fail_after(10), closing(client()) as untrusting, pytest.raises(BackendUnavailable):
        await untrusting.get(url + "/v1/models", timeout_s=5)
