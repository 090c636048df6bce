"""OpenAI-compatible HTTP backends and pools of them, on `backends.http_client`.

A pool chooses the backend with the fewest requests in flight among the healthy ones. A
backend that cannot be connected to is taken out of rotation and probed back by
`probe_forever`. A 429 or 503 from a backend is not an exception: it is a response the
service reads as "backend saturated".
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio
from opentelemetry import propagate

from backends.http_client import BackendError, BackendUnavailable, HttpClient, Response


class HttpBackend:
    """One OpenAI-compatible server at `url`."""

    def __init__(self, url: str, client: HttpClient) -> None:
        self.url = url.rstrip("/")
        self._client = client
        self._limits = client.limits
        self._pool, path = client.pool_for(self.url)
        self._path = path.rstrip("/")
        self.inflight = 0
        self.healthy = True
        self._eject_s = self._limits.eject_s
        self.retry_at = -math.inf

    @asynccontextmanager
    async def post(
        self, path: str, body: bytes, headers: dict[str, str], *, timeout_s: float | None = None
    ) -> AsyncIterator[Response]:
        """POST `body` and yield the response once its head is in; `timeout_s` bounds each
        read. The connection goes back to the pool on exit if the body was read whole."""
        headers = dict(headers)
        propagate.inject(headers)
        read_timeout_s = self._limits.read_timeout_s if timeout_s is None else timeout_s
        self.inflight += 1
        try:
            async with AsyncExitStack() as stack:
                try:
                    response = await stack.enter_async_context(
                        self._pool.stream("POST", self._path + path, headers, body, read_timeout_s)
                    )
                except BackendUnavailable:
                    self.eject()
                    raise
                yield response
        finally:
            self.inflight -= 1

    def eject(self) -> None:
        self.healthy = False
        self.retry_at = trio.current_time() + self._eject_s
        self._eject_s = min(self._limits.max_eject_s, self._eject_s * 2)

    async def probe(self) -> bool:
        """GET /v1/models; a backend that answers 2xx is healthy again."""
        try:
            status, _ = await self._client.get(
                self.url + "/v1/models", timeout_s=self._limits.connect_timeout_s
            )
        except BackendError:
            return False
        if status < 300:
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
        timeout_s: float | None = None,
    ) -> AsyncIterator[Response]:
        """POST to the least busy backend; a failed connection moves on to the next one."""
        tried: set[str] = set()
        while True:
            backend = self.choose(frozenset(tried))
            tried.add(backend.url)
            stack = AsyncExitStack()
            try:
                upstream = await stack.enter_async_context(
                    backend.post(path, body, headers, timeout_s=timeout_s)
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
