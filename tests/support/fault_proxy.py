"""A fault-injecting HTTP/1.1 proxy for tests: gateway -> proxy -> backend, on loopback.

Why our own, and why h11 on both sides: the faults that matter to a gateway live at the HTTP
level (a 500, an answer that never comes, one that comes slowly or drop by drop), so the proxy
needs request boundaries. It reads each request whole from the client (keep-alive is kept, as
the gateway's connection pool expects), sends it to the upstream on a fresh connection with
`Connection: close`, and relays the response event by event, so SSE streams pass through
chunk by chunk. The fault is read when a request arrives; the test switches it at any time:

    proxy = await nursery.start(serve_fault_proxy, "http://127.0.0.1:8001")
    proxy.mode = Fault.slow(0.5)        # then Fault.HANG, Fault.ERROR_500, Fault.PASS, ...

    Fault.PASS             forward as is
    Fault.slow(d)          wait d seconds, then forward (time to first byte + d)
    Fault.drip(d, n)       forward the head at once, then each body chunk in n pieces, d apart
    Fault.HANG             read the request and never answer, until the client leaves
    Fault.ERROR_500        answer 500 at once; the upstream is not called
    Fault.HTML_200         answer 200 with an HTML page (a misrouted load balancer's), at once
    Fault.REFUSE           stop listening and drop every open connection: connects are refused
                           until the mode changes again, when the proxy listens on the same port

An upstream the proxy cannot reach is answered with a 502 (what a real proxy does), so a
backend that is down behind the proxy looks like a broken backend, not a refused connection:
use `Fault.REFUSE` (or no proxy) for the latter.
"""

from __future__ import annotations

import enum
import json
import math
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import h11
import trio

from tests.support.h11_server import read_request

READ_BYTES = 65_536
IDLE_S = 60.0  # an idle keep-alive connection is closed after this
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)


class FaultKind(enum.Enum):
    PASS = "pass"
    SLOW = "slow"
    DRIP = "drip"
    HANG = "hang"
    ERROR_500 = "error_500"
    HTML_200 = "html_200"
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class Fault:
    """What the proxy does to the next requests; see the module docstring."""

    kind: FaultKind
    delay_s: float = 0.0
    pieces: int = 1

    PASS: ClassVar[Fault]
    HANG: ClassVar[Fault]
    ERROR_500: ClassVar[Fault]
    HTML_200: ClassVar[Fault]
    REFUSE: ClassVar[Fault]

    @staticmethod
    def slow(delay_s: float) -> Fault:
        return Fault(FaultKind.SLOW, delay_s=delay_s)

    @staticmethod
    def drip(interval_s: float, pieces: int = 8) -> Fault:
        return Fault(FaultKind.DRIP, delay_s=interval_s, pieces=max(1, pieces))


Fault.PASS = Fault(FaultKind.PASS)
Fault.HANG = Fault(FaultKind.HANG)
Fault.ERROR_500 = Fault(FaultKind.ERROR_500)
Fault.HTML_200 = Fault(FaultKind.HTML_200)
Fault.REFUSE = Fault(FaultKind.REFUSE)


@dataclass(frozen=True, slots=True)
class ProxyStats:
    requests: int  # requests read from clients
    forwarded: int  # responses relayed whole from the upstream
    failed_500: dict[str, int]  # 500s injected, by path
    hung: dict[str, int]  # requests left unanswered, by path
    hanging: dict[str, int]  # of those, the ones whose client is still connected
    open_connections: int
    listening: bool


class _UpstreamFailed(Exception):
    """The upstream could not be reached, or its response broke off."""


class FaultProxy:
    """The proxy; run it with `serve_fault_proxy`, switch `mode` from the test."""

    def __init__(
        self, upstream_url: str, *, host: str = "127.0.0.1", connect_timeout_s: float = 1.0
    ) -> None:
        parts = urllib.parse.urlsplit(upstream_url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"expected http://host:port, got {upstream_url!r}")
        self.upstream = (parts.hostname, parts.port)
        self.host = host
        self.port = 0
        self.connect_timeout_s = connect_timeout_s
        self._mode = Fault.PASS
        self._changed = trio.Event()
        self._listening = False
        self._counts = {"requests": 0, "forwarded": 0}
        self._failed: Counter[str] = Counter()
        self._hung: Counter[str] = Counter()
        self._hanging: Counter[str] = Counter()
        self._open = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def mode(self) -> Fault:
        return self._mode

    @mode.setter
    def mode(self, fault: Fault) -> None:
        self._mode = fault
        self._changed.set()
        self._changed = trio.Event()

    def statistics(self) -> ProxyStats:
        return ProxyStats(
            **self._counts,
            failed_500=dict(self._failed),
            hung=dict(self._hung),
            hanging={path: n for path, n in self._hanging.items() if n},
            open_connections=self._open,
            listening=self._listening,
        )

    async def wait_mode(self, wanted: Callable[[Fault], bool]) -> None:
        while not wanted(self._mode):
            await self._changed.wait()

    async def run(self, *, task_status: trio.TaskStatus[FaultProxy]) -> None:
        """Serve until cancelled; reports the proxy itself once it listens."""
        listener = await self._listen()
        task_status.started(self)
        while True:
            await self._serve_until_refused(listener)
            await self.wait_mode(lambda m: m.kind is not FaultKind.REFUSE)
            listener = await self._listen()

    async def _listen(self) -> trio.SocketListener:
        (listener,) = await trio.open_tcp_listeners(self.port, host=self.host)  # SO_REUSEADDR
        self.port = listener.socket.getsockname()[1]
        return listener

    async def _serve_until_refused(self, listener: trio.SocketListener) -> None:
        async with listener, trio.open_nursery() as nursery:
            self._listening = True
            nursery.start_soon(trio.serve_listeners, self._handle, [listener])
            try:
                await self.wait_mode(lambda m: m.kind is FaultKind.REFUSE)
            finally:
                self._listening = False
            nursery.cancel_scope.cancel()  # closes every client connection too

    # -- one client connection --------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        self._open += 1
        try:
            while True:
                request = None
                with trio.move_on_after(IDLE_S):
                    request = await read_request(conn, stream)
                if request is None:
                    return
                self._counts["requests"] += 1
                if not await self._answer(self._mode, conn, stream, *request):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return  # the client went away or spoke nonsense: drop the connection
        finally:
            self._open -= 1

    async def _answer(
        self,
        fault: Fault,
        conn: h11.Connection,
        stream: trio.SocketStream,
        request: h11.Request,
        body: bytes,
    ) -> bool:
        """Answer one request under `fault`; False when the connection must close."""
        if fault.kind is FaultKind.REFUSE:
            return False
        path = request.target.decode("latin-1").split("?", 1)[0]
        if fault.kind is FaultKind.ERROR_500:
            self._failed[path] += 1
            await _send_error(conn, stream, 500, "Injected fault: internal server error.")
            return True
        if fault.kind is FaultKind.HTML_200:
            page = b"<html><body><h1>Welcome to nginx!</h1></body></html>"
            await _send_body(conn, stream, 200, b"text/html", page)
            return True
        if fault.kind is FaultKind.HANG:
            self._hung[path] += 1
            self._hanging[path] += 1
            try:
                await _wait_client_gone(stream)
            finally:
                self._hanging[path] -= 1
            return False
        if fault.kind is FaultKind.SLOW:
            await trio.sleep(fault.delay_s)
        return await self._forward(fault, conn, stream, request, body)

    async def _forward(
        self,
        fault: Fault,
        conn: h11.Connection,
        stream: trio.SocketStream,
        request: h11.Request,
        body: bytes,
    ) -> bool:
        try:
            with trio.fail_after(self.connect_timeout_s):
                upstream = await trio.open_tcp_stream(*self.upstream)
        except (OSError, trio.TooSlowError):
            await _send_error(conn, stream, 502, "Injected proxy: the upstream is unreachable.")
            return True
        async with upstream:
            try:
                up = await _send_upstream(upstream, request, body)
                await self._relay(fault, up, upstream, conn, stream)
            except _UpstreamFailed:
                if conn.our_state is h11.SEND_RESPONSE:  # nothing sent yet: say so
                    await _send_error(conn, stream, 502, "Injected proxy: the upstream failed.")
                    return True
                return False  # the head is gone: all we can do is break off
        return True

    async def _relay(
        self,
        fault: Fault,
        up: h11.Connection,
        upstream: trio.SocketStream,
        conn: h11.Connection,
        stream: trio.SocketStream,
    ) -> None:
        while True:
            event = await _next_upstream_event(up, upstream)
            if isinstance(event, h11.Response):
                headers = [(n, v) for n, v in event.headers if n.lower() not in _RESPONSE_HOPS]
                head = h11.Response(
                    status_code=event.status_code, headers=headers, reason=event.reason
                )
                await stream.send_all(conn.send(head) or b"")
            elif isinstance(event, h11.Data):
                await _send_data(conn, stream, bytes(event.data), fault)
            elif isinstance(event, h11.EndOfMessage):
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                self._counts["forwarded"] += 1
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise _UpstreamFailed("the upstream closed before the end of its response")


_RESPONSE_HOPS = frozenset({b"connection", b"keep-alive", b"proxy-connection"})


async def _wait_client_gone(stream: trio.SocketStream) -> None:
    try:
        while await stream.receive_some(READ_BYTES):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _send_error(
    conn: h11.Connection, stream: trio.SocketStream, status: int, message: str
) -> None:
    body = json.dumps({"error": {"message": message, "type": "server_error"}}).encode()
    await _send_body(conn, stream, status, b"application/json", body)


async def _send_body(
    conn: h11.Connection, stream: trio.SocketStream, status: int, kind: bytes, body: bytes
) -> None:
    headers = [(b"content-type", kind), (b"content-length", b"%d" % len(body))]
    for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body)):
        await stream.send_all(conn.send(event) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def _send_data(
    conn: h11.Connection, stream: trio.SocketStream, data: bytes, fault: Fault
) -> None:
    if fault.kind is not FaultKind.DRIP:
        await stream.send_all(conn.send(h11.Data(data=data)) or b"")
        return
    size = max(1, math.ceil(len(data) / fault.pieces))
    for start in range(0, len(data), size):
        await trio.sleep(fault.delay_s)
        await stream.send_all(conn.send(h11.Data(data=data[start : start + size])) or b"")


async def _send_upstream(
    upstream: trio.SocketStream, request: h11.Request, body: bytes
) -> h11.Connection:
    up = h11.Connection(h11.CLIENT)
    headers = [(n, v) for n, v in request.headers if n.lower() not in HOP_BY_HOP]
    headers += [(b"connection", b"close"), (b"content-length", b"%d" % len(body))]
    head = h11.Request(method=request.method, target=request.target, headers=headers)
    try:
        data = up.send(head) or b""
        if body:
            data += up.send(h11.Data(data=body)) or b""
        await upstream.send_all(data + (up.send(h11.EndOfMessage()) or b""))
    except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
        raise _UpstreamFailed(str(exc)) from exc
    return up


async def _next_upstream_event(up: h11.Connection, upstream: trio.SocketStream) -> object:
    try:
        while True:
            event = up.next_event()
            if event is not h11.NEED_DATA and not isinstance(event, h11.InformationalResponse):
                return event
            if event is h11.NEED_DATA:
                up.receive_data(await upstream.receive_some(READ_BYTES))
    except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
        raise _UpstreamFailed(str(exc)) from exc


async def serve_fault_proxy(
    upstream_url: str, *, task_status: trio.TaskStatus[FaultProxy] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve a `FaultProxy` in front of `upstream_url` until cancelled. Reports the proxy (its
    `port` and `url`, and the `mode` to switch): `proxy = await nursery.start(serve_fault_proxy,
    url)`."""
    await FaultProxy(upstream_url).run(task_status=task_status)
