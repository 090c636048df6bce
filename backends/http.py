"""OpenAI-compatible HTTP backends on httpx2, and pools of them.

Exception tree (the upstream is to blame for all of these; the caller's mistakes never
reach this module):

    BackendError
    ├── BackendUnavailable   no healthy backend, or the connection failed (nothing was sent)
    ├── BackendTimeout       connected, but the backend did not answer in time
    └── BackendBroken        the response broke off or made no sense

A 429 or 503 from the backend is not an exception: it is a response the service reads as
"backend saturated". httpx2's exceptions are translated here and nowhere else.

A pool chooses the backend with the fewest requests in flight among the healthy ones. A
backend whose connection fails is taken out of rotation and probed back by `probe_forever`.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import httpx2
import trio
from opentelemetry import propagate

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


class BackendError(Exception):
    """The upstream failed us."""


class BackendUnavailable(BackendError):
    pass


class BackendTimeout(BackendError):
    pass


class BackendBroken(BackendError):
    pass


@dataclass(frozen=True, slots=True)
class BackendLimits:
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 300.0
    max_connections: int = 512
    eject_s: float = 2.0  # first ejection; doubles up to max_eject_s while probes fail
    max_eject_s: float = 30.0


def make_client(limits: BackendLimits) -> httpx2.AsyncClient:
    """One client per process: its pool keeps connections to every backend alive."""
    return httpx2.AsyncClient(
        timeout=httpx2.Timeout(
            limits.read_timeout_s, connect=limits.connect_timeout_s, pool=limits.read_timeout_s
        ),
        limits=httpx2.Limits(
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_connections,
        ),
        headers={"accept-encoding": "identity"},
    )


class Upstream:
    """A backend's response, streamed: read `status_code`/`headers`, then the body."""

    def __init__(self, response: httpx2.Response) -> None:
        self._response = response

    @property
    def status_code(self) -> int:
        return self._response.status_code

    def headers(self) -> dict[str, str]:
        return {k: v for k, v in self._response.headers.items() if k.lower() not in HOP_BY_HOP}

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx2.TimeoutException as exc:
            raise BackendTimeout("backend stopped sending in time") from exc
        except httpx2.HTTPError as exc:
            raise BackendBroken(f"backend response broke off: {exc}") from exc

    async def read(self) -> bytes:
        if self._response.is_stream_consumed:  # a call made with stream=False
            return self._response.content
        return b"".join([chunk async for chunk in self.chunks()])


class HttpBackend:
    """One OpenAI-compatible server at `url`."""

    def __init__(self, url: str, client: httpx2.AsyncClient, limits: BackendLimits) -> None:
        self.url = url.rstrip("/")
        self._client = client
        self._limits = limits
        self.inflight = 0
        self.healthy = True
        self._eject_s = limits.eject_s
        self.retry_at = -math.inf

    @asynccontextmanager
    async def post(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str],
        *,
        stream: bool = True,
        timeout_s: float | None = None,
    ) -> AsyncIterator[Upstream]:
        """POST `body` and yield the response, streamed unless `stream` is False (then it
        is read whole first, which is cheaper); the connection is released on exit."""
        headers = dict(headers)
        propagate.inject(headers)
        timeout = httpx2.Timeout(
            self._limits.read_timeout_s if timeout_s is None else timeout_s,
            connect=self._limits.connect_timeout_s,
        )
        request = self._client.build_request(
            "POST", self.url + path, content=body, headers=headers, timeout=timeout
        )
        self.inflight += 1
        try:
            try:
                response = await self._client.send(request, stream=stream)
            except (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout) as exc:
                self.eject()
                raise BackendUnavailable(f"cannot reach backend {self.url}: {exc}") from exc
            except httpx2.TimeoutException as exc:
                raise BackendTimeout(f"backend {self.url} did not answer in time") from exc
            except httpx2.HTTPError as exc:
                raise BackendBroken(f"backend {self.url} failed: {exc}") from exc
            try:
                yield Upstream(response)
            finally:
                with trio.CancelScope(shield=True):
                    await response.aclose()
        finally:
            self.inflight -= 1

    def eject(self) -> None:
        self.healthy = False
        self.retry_at = trio.current_time() + self._eject_s
        self._eject_s = min(self._limits.max_eject_s, self._eject_s * 2)

    async def probe(self) -> bool:
        """GET /v1/models; a backend that answers 2xx is healthy again."""
        try:
            response = await self._client.get(
                self.url + "/v1/models", timeout=self._limits.connect_timeout_s
            )
        except httpx2.HTTPError:
            return False
        if response.status_code < 300:
            self.healthy = True
            self._eject_s = self._limits.eject_s
            return True
        return False


class BackendPool:
    """The backends that serve one model; least in flight first."""

    def __init__(self, backends: list[HttpBackend]) -> None:
        if not backends:
            raise ValueError("a pool needs at least one backend")
        self.backends = backends

    @property
    def inflight(self) -> int:
        return sum(b.inflight for b in self.backends)

    @property
    def any_healthy(self) -> bool:
        return any(b.healthy for b in self.backends)

    def choose(self, exclude: frozenset[str] = frozenset()) -> HttpBackend:
        best: HttpBackend | None = None
        for backend in self.backends:
            usable = backend.healthy and backend.url not in exclude
            if usable and (best is None or backend.inflight < best.inflight):
                best = backend
        if best is None:
            raise BackendUnavailable("no healthy backend for this model")
        return best

    @asynccontextmanager
    async def post(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str],
        *,
        stream: bool = True,
        timeout_s: float | None = None,
    ) -> AsyncIterator[Upstream]:
        """POST to the least busy backend; a failed connection moves on to the next one."""
        tried: set[str] = set()
        while True:
            backend = self.choose(frozenset(tried))
            tried.add(backend.url)
            stack = AsyncExitStack()
            try:
                upstream = await stack.enter_async_context(
                    backend.post(path, body, headers, stream=stream, timeout_s=timeout_s)
                )
            except BackendUnavailable:
                if not any(b.healthy and b.url not in tried for b in self.backends):
                    raise
                continue
            async with stack:
                yield upstream
            return

    async def probe_forever(self, *, interval_s: float = 0.5) -> None:
        """Bring ejected backends back once they answer again."""
        while True:
            now = trio.current_time()
            for backend in self.backends:
                if not backend.healthy and now >= backend.retry_at and not await backend.probe():
                    backend.eject()
            await trio.sleep(interval_s)
