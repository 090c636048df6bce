"""A small HTTP/1.1 client on trio and h11: keep-alive connections, one pool per origin.

Why our own: the gateway's own work per request is a few hundred microseconds, and httpx2's
pool spent about as much again choosing a connection (it scans every connection for every
request, polling each one's socket). Here an origin keeps a stack of idle connections: taking
one is a pop and one non-blocking poll of its socket. h11 speaks the protocol. The figures
are in bench/RESULTS.md.

Exception tree (the upstream is to blame for all of these; the caller's mistakes never reach
this module). trio's, h11's and the socket's exceptions are translated here and nowhere else:

    BackendError
    ├── BackendUnavailable   the connection could not be made (nothing was sent)
    ├── BackendTimeout       connected, but the server did not answer in time
    └── BackendBroken        the connection broke, or the response made no sense
        └── BackendTooLarge  a whole response (`read()`) larger than `max_response_bytes`

Keep-alive races: a server may close an idle connection just as we reuse it. A reused
connection that fails before any byte of the response has arrived, within `retry_window_s`
of sending, is retried once on a new connection (browsers do the same; the window keeps a
backend that died an hour into a generation from being asked twice); a new connection is
never retried. An idle connection older than `keepalive_s` is not reused (it is closed when
next met), before the usual 5 s server-side keep-alive timeouts.

A response that is not read to its end (a client went away mid-stream) closes its
connection: that is how the upstream call is closed.
"""

from __future__ import annotations

import math
import select
import ssl
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from backends.eager import send_all_eagerly
from scheduler.errors import SchedulerError

RECEIVE_BYTES = 65536
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-encoding",
        "upgrade",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-authenticate",
        "server",
        "date",
    }
)
_OWN_HEADERS = frozenset({"host", "accept-encoding", "content-length", "transfer-encoding"})
_NETWORK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


REFUSED_CREDENTIALS = frozenset({401, 403, 407})  # a backend (or a proxy) refusing our key


def bearer(api_key: str) -> dict[str, str]:
    """The header that carries a backend's API key; none without one."""
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


class BackendError(SchedulerError):
    """The upstream failed us."""


class BackendUnavailable(BackendError):
    pass


class BackendTimeout(BackendError):
    pass


class BackendDeadline(BackendTimeout):
    """A read outlasted the response's `deadline_at`: the caller's bound, not the backend's
    read timeout."""


class BackendBroken(BackendError):
    pass


class BackendTooLarge(BackendBroken):
    """A response read whole ran past `BackendLimits.max_response_bytes` (it is not kept)."""


class _Retry(Exception):
    """A reused connection died before the response began: try once on a new one."""


@dataclass(frozen=True, slots=True)
class BackendLimits:
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 300.0  # between two reads of one response
    max_connections: int = 512  # per backend
    keepalive_s: float = 4.0  # an idle connection older than this is closed, not reused
    retry_window_s: float = 1.0  # a reused connection dying this soon is the keep-alive race
    eject_s: float = 2.0  # first ejection; doubles up to max_eject_s while probes fail
    max_eject_s: float = 30.0
    max_response_bytes: int = 16 * 1024 * 1024  # a whole (non-streamed) response, at most

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"backend.max_connections must be >= 1, got {self.max_connections}")
        if self.max_response_bytes < 1024:
            raise ValueError(
                f"backend.max_response_bytes must be >= 1024, got {self.max_response_bytes}"
            )
        for name in ("connect_timeout_s", "read_timeout_s", "eject_s", "max_eject_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"backend.{name} must be a finite number > 0, got {value}")
        for name in ("keepalive_s", "retry_window_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"backend.{name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> tuple[Origin, str]:
        """The origin of `url` and its path (with the query), "/" when empty."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s) URL, got {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return cls(parts.scheme, parts.hostname, port), target

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


class _Connection:
    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self.stream = stream
        self.socket = sock
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def dropped(self) -> bool:
        """An idle connection with anything to read has been closed by the server (or sent
        what it should not have): either way it cannot carry a request."""
        poller = select.poll()  # not select.select: it cannot take descriptors over 1023
        poller.register(self.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        self.socket.close()


class Response:
    """A response, streamed: read `status_code` and `headers`, then the body once."""

    def __init__(
        self, conn: _Connection, head: h11.Response, read_timeout_s: float, max_bytes: int
    ) -> None:
        self._conn = conn
        self._max_bytes = max_bytes
        self.status_code: int = head.status_code
        self.headers: list[tuple[bytes, bytes]] = list(head.headers)  # names in lower case
        self._read_timeout_s = read_timeout_s
        self.complete = False
        # an absolute bound on every read of the body, set by the caller as it goes (one
        # cancel scope per read instead of the caller's around it: a stream's chunks each
        # cost one less)
        self.deadline_at = math.inf

    def end_to_end_headers(self) -> dict[str, str]:
        """The headers a proxy passes on: not the hop-by-hop ones (RFC 9110 §7.6.1), nor CORS,
        which speaks for the backend's origin, not the proxy's (llama-server sends an empty
        `Access-Control-Allow-Origin`; vLLM's default allows any origin that asks)."""
        passed = {}
        for raw_name, value in self.headers:
            name = raw_name.decode("latin-1")
            if name not in HOP_BY_HOP and not name.startswith("access-control-"):
                passed[name] = value.decode("latin-1")
        return passed

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: what came in one read is one piece (a backend's chunks
        already buffered are joined, so a proxy that is behind catches up in fewer, larger
        writes instead of one per chunk)."""
        conn = self._conn
        event = await _next_event(conn, self._read_timeout_s, deadline_at=self.deadline_at)
        while True:
            if isinstance(event, h11.EndOfMessage):
                self.complete = True
                return
            if not isinstance(event, h11.Data):
                event = await _next_event(conn, self._read_timeout_s, deadline_at=self.deadline_at)
                continue
            piece = bytes(event.data)
            event = _buffered_event(conn)  # what is buffered already, without a read
            while isinstance(event, h11.Data):
                piece += event.data
                event = _buffered_event(conn)
            yield piece
            if event is h11.NEED_DATA:  # (h11 was just asked: straight to the read)
                event = await _next_event(
                    conn, self._read_timeout_s, deadline_at=self.deadline_at, need_data=True
                )

    async def read(self) -> bytes:
        """The whole body; BackendTooLarge past `max_response_bytes` (memory stays bounded:
        what was read is dropped, and the connection closes, the rest unread)."""
        parts, size = [], 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size > self._max_bytes:
                raise BackendTooLarge(f"the response is larger than {self._max_bytes} bytes")
            parts.append(chunk)
        return b"".join(parts)


class OriginPool:
    """Keep-alive connections to one origin; at most `limits.max_connections` open."""

    def __init__(
        self, origin: Origin, limits: BackendLimits, ssl_context: ssl.SSLContext | None
    ) -> None:
        """`ssl_context`: for an https origin, None for http."""
        self.origin = origin
        self._limits = limits
        self._ssl_context = ssl_context
        self._idle: deque[_Connection] = deque()
        self._slots = trio.Semaphore(limits.max_connections)

    @asynccontextmanager
    async def stream(
        self, method: str, target: str, headers: dict[str, str], body: bytes, read_timeout_s: float
    ) -> AsyncIterator[Response]:
        """Send the request and yield the response once its head has arrived."""
        # this client cannot decompress, and it owns the framing headers
        head = [("host", self.origin.host_header), ("accept-encoding", "identity")]
        head += [(k, v) for k, v in headers.items() if k.lower() not in _OWN_HEADERS]
        if body or method not in ("GET", "HEAD"):
            head.append(("content-length", str(len(body))))
        request = h11.Request(method=method, target=target, headers=head)
        try:  # a free slot is taken without a yield to the scheduler (`Semaphore` yields)
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            conn = self._take_idle()
            response: Response | None = None
            try:
                try:
                    response = await self._exchange(conn, request, body, read_timeout_s)
                except _Retry:
                    conn = None
                    response = await self._exchange(conn, request, body, read_timeout_s)
                yield response
            finally:
                if response is not None and response.complete:
                    self._give_back(response._conn)
                elif response is not None:
                    response._conn.close()
        finally:
            self._slots.release()

    async def _exchange(
        self, conn: _Connection | None, request: h11.Request, body: bytes, read_timeout_s: float
    ) -> Response:
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
        try:
            data = conn.h11.send(request) or b""
            if body:
                data += conn.h11.send(h11.Data(data=body)) or b""
            data += conn.h11.send(h11.EndOfMessage()) or b""
            try:  # no yield when the socket takes it: one turn of the scheduler less
                await send_all_eagerly(conn.stream, data)
            except _NETWORK_ERRORS as exc:
                if reused:
                    raise _Retry from exc
                raise BackendBroken(f"{self.origin.host_header}: sending failed: {exc}") from exc
            retry_window_s = self._limits.retry_window_s if reused else -math.inf
            retry_until = trio.current_time() + retry_window_s
            event = await _next_event(conn, read_timeout_s, retry_until=retry_until)
            while isinstance(event, h11.InformationalResponse):  # 1xx: the real one follows
                event = await _next_event(conn, read_timeout_s)
            if not isinstance(event, h11.Response):
                raise BackendBroken(f"{self.origin.host_header}: no response head")
            return Response(conn, event, read_timeout_s, self._limits.max_response_bytes)
        except BaseException:
            conn.close()
            raise

    def _take_idle(self) -> _Connection | None:
        expired_at = trio.current_time() - self._limits.keepalive_s
        while self._idle:
            conn = self._idle.pop()
            if conn.idle_since >= expired_at and not conn.dropped():
                return conn
            conn.close()
        return None

    def _give_back(self, conn: _Connection) -> None:
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            now = trio.current_time()
            conn.idle_since = now
            self._idle.append(conn)
            while self._idle[0].idle_since < now - self._limits.keepalive_s:
                self._idle.popleft().close()
        else:
            conn.close()  # the server asked to close, or the exchange went wrong

    async def _connect(self) -> _Connection:
        host, port = self.origin.host, self.origin.port
        tcp: trio.SocketStream | None = None
        try:
            with trio.fail_after(self._limits.connect_timeout_s):
                tcp = await trio.open_tcp_stream(host, port)
                stream: trio.abc.Stream = tcp
                if self._ssl_context is not None:
                    stream = trio.SSLStream(tcp, self._ssl_context, server_hostname=host)
                    await stream.do_handshake()
        except BaseException as exc:
            if tcp is not None:
                tcp.socket.close()  # a handshake that failed, timed out or was cancelled
            if isinstance(exc, trio.TooSlowError):
                raise BackendUnavailable(
                    f"{self.origin.host_header}: connecting timed out"
                ) from exc
            if isinstance(exc, _NETWORK_ERRORS):
                message = f"{self.origin.host_header}: cannot connect: {exc}"
                raise BackendUnavailable(message) from exc
            raise
        return _Connection(stream, tcp.socket)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


def _buffered_event(conn: _Connection) -> object:
    """The next h11 event from what was read already (`h11.NEED_DATA` if none)."""
    try:
        return conn.h11.next_event()
    except h11.RemoteProtocolError as exc:
        raise BackendBroken(f"the backend's response made no sense: {exc}") from exc


async def _next_event(
    conn: _Connection,
    read_timeout_s: float,
    *,
    retry_until: float = -math.inf,
    deadline_at: float = math.inf,
    need_data: bool = False,
) -> object:
    """The next h11 event, reading as needed, each read within `read_timeout_s` and before
    `deadline_at` (else BackendDeadline); a connection that ends before any byte arrives,
    until `retry_until`, raises _Retry. `need_data`: h11 said NEED_DATA just now (a read
    first)."""
    retry = True
    try:
        while True:
            if not need_data:
                event = conn.h11.next_event()
                if event is not h11.NEED_DATA:
                    return event
            need_data = False
            # a scope, not `trio.fail_at` (a generator-based context manager: microseconds
            # more per read, and a stream reads once per chunk)
            read_at = min(trio.current_time() + read_timeout_s, deadline_at)
            with trio.CancelScope(deadline=read_at) as scope:
                data = await conn.stream.receive_some(RECEIVE_BYTES)
            if scope.cancelled_caught:
                raise trio.TooSlowError
            if not data and retry and trio.current_time() <= retry_until:
                raise _Retry
            retry = False
            conn.h11.receive_data(bytes(data))  # the same object when it is bytes already
    except trio.TooSlowError as exc:
        if trio.current_time() >= deadline_at:
            raise BackendDeadline("the response's deadline passed") from exc
        raise BackendTimeout("the backend stopped sending in time") from exc
    except _NETWORK_ERRORS as exc:
        if retry and trio.current_time() <= retry_until:
            raise _Retry from exc
        raise BackendBroken(f"the connection to the backend broke: {exc}") from exc
    except h11.RemoteProtocolError as exc:
        raise BackendBroken(f"the backend's response made no sense: {exc}") from exc


class HttpClient:
    """HTTP/1.1 to any number of origins, a pool each; close it when done."""

    def __init__(self, limits: BackendLimits, ssl_context: ssl.SSLContext | None = None) -> None:
        self.limits = limits
        self._ssl_context = ssl_context
        self._pools: dict[Origin, OriginPool] = {}

    def pool_for(self, url: str) -> tuple[OriginPool, str]:
        """The pool for `url`'s origin and the request target (path and query)."""
        origin, target = Origin.of(url)
        pool = self._pools.get(origin)
        if pool is None:
            context = None
            if origin.scheme == "https":  # the system's CAs, loaded once and only if needed
                context = self._ssl_context = self._ssl_context or ssl.create_default_context()
            pool = self._pools[origin] = OriginPool(origin, self.limits, context)
        return pool, target

    async def get(
        self, url: str, *, headers: dict[str, str] | None = None, timeout_s: float
    ) -> tuple[int, bytes]:
        """GET `url` whole within `timeout_s` (connecting included): (status, body)."""
        return await self.request("GET", url, headers=headers, timeout_s=timeout_s)

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        timeout_s: float,
    ) -> tuple[int, bytes]:
        """Send `method` `url` with `body` and read the answer whole within `timeout_s`
        (connecting included): (status, body). The probes' GETs and the bench load
        generators use it; the gateway's calls stream through `OriginPool.stream`."""
        pool, target = self.pool_for(url)
        try:
            with trio.fail_after(timeout_s):
                async with pool.stream(method, target, headers or {}, body, timeout_s) as response:
                    return response.status_code, await response.read()
        except trio.TooSlowError as exc:
            raise BackendTimeout(f"{url}: no answer in {timeout_s} s") from exc

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
