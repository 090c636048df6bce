"""OpenAI-compatible HTTP backends and pools of them, on `backends.http.client`.

A pool chooses the backend with the fewest requests in flight among the healthy ones. Health
is known before any request fails: from start-up, `probe_forever` sends each backend a GET of
/v1/models every `PROBE_INTERVAL_S`. A backend that cannot be connected to (by a probe or by a
request) is taken out of rotation; once out, it is probed again after `eject_s`, doubling up
to `max_eject_s` while it fails, and comes back on any answer below 500. Only "cannot
connect" ejects: a backend that connects but answers slowly is busy (or hung), which the
request timeout and the controller deal with, and a probe stuck behind a saturated backend
must not take it out.
Each change is logged once (WARNING out, INFO back), on the `scheduler.service.backends` logger.

A 429 or 503 from a backend is not an exception: it is a response the service reads as
"backend saturated".
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import trio
from opentelemetry import propagate

from backends.http.client import (
    BackendError,
    BackendUnavailable,
    HttpClient,
    Response,
    bearer,
)

log = logging.getLogger("scheduler.service.backends")
PROBE_INTERVAL_S = 0.5


class HttpBackend:
    """One OpenAI-compatible server at `url`; `api_key`, when the server wants one (vLLM's
    and llama-server's `--api-key`), goes with every request and probe as a bearer token."""

    def __init__(self, url: str, client: HttpClient, *, api_key: str = "") -> None:
        self.url = url.rstrip("/")
        self._client = client
        self._auth = bearer(api_key)
        self._limits = client.limits
        self._pool, path = client.pool_for(self.url)
        self._path = path.rstrip("/")
        self.inflight = 0
        self.healthy = True
        self._eject_s = self._limits.eject_s
        self.retry_at = -math.inf
        # longer than the connect timeout, so that a connection that cannot be made is told
        # (BackendUnavailable) from a server that connects but does not answer
        self._probe_timeout_s = 2 * self._limits.connect_timeout_s

    @asynccontextmanager
    async def post(
        self, path: str, body: bytes, headers: dict[str, str], *, timeout_s: float | None = None
    ) -> AsyncIterator[Response]:
        """POST `body` and yield the response once its head is in; `timeout_s` bounds each
        read. The connection goes back to the pool on exit if the body was read whole."""
        headers = {**headers, **self._auth}
        propagate.inject(headers)
        read_timeout_s = self._limits.read_timeout_s if timeout_s is None else timeout_s
        self.inflight += 1
        try:
            async with AsyncExitStack() as stack:
                try:
                    response = await stack.enter_async_context(
                        self._pool.stream("POST", self._path + path, headers, body, read_timeout_s)
                    )
                except BackendUnavailable as exc:
                    self.eject(str(exc))
                    raise
                yield response
        finally:
            self.inflight -= 1

    def eject(self, reason: str) -> None:
        """Take this backend out of rotation; one already out keeps its probe schedule (a
        burst of failed requests must not push its return back)."""
        if not self.healthy:
            return
        self.healthy = False
        self._eject_s = self._limits.eject_s
        self._probe_later()
        log.warning("backend %s ejected: %s", self.url, reason)

    def _probe_later(self) -> None:
        self.retry_at = trio.current_time() + self._eject_s
        self._eject_s = min(self._limits.max_eject_s, self._eject_s * 2)

    def _readmit(self) -> None:
        self.healthy = True
        self.retry_at = -math.inf
        log.info("backend %s back in rotation", self.url)

    async def probe(self) -> bool:
        """GET /v1/models and update the health from it; returns whether healthy after.

        In rotation: ejected if it cannot be connected to. Out: back on any answer below 500
        (a server without the route, or behind a key we lack, is up; a 503 is still starting),
        else probed again later."""
        try:
            status, _ = await self._client.get(
                self.url + "/v1/models", headers=self._auth, timeout_s=self._probe_timeout_s
            )
        except BackendUnavailable as exc:
            if self.healthy:
                self.eject(str(exc))
            else:
                self._probe_later()
            return False
        except BackendError:  # connected, but no sensible answer in time: busy, or hung
            status = 0
        if status and status < 500 and not self.healthy:  # up: even a 404 or 401 is an answer
            self._readmit()
        elif not self.healthy:
            self._probe_later()
        return self.healthy

    async def probe_forever(self, *, interval_s: float = PROBE_INTERVAL_S) -> None:
        """Probe every `interval_s` while in rotation; once out, at its `retry_at`."""
        while True:
            await trio.sleep(interval_s)
            if self.healthy or trio.current_time() >= self.retry_at:
                await self.probe()


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

    @property
    def healthy_count(self) -> int:
        return sum(b.healthy for b in self.backends)

    def in_rotation(self, url: str) -> bool:
        """False for a backend of this pool that is ejected; True for any other name (a
        probe of something that is not one of its backends, a DCGM exporter say)."""
        url = url.rstrip("/")
        return all(b.healthy for b in self.backends if b.url == url)

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

    async def probe_forever(
        self,
        *,
        interval_s: float = PROBE_INTERVAL_S,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Probe every backend, all at once; reports started when each has been probed once
        (so a backend down at start-up is known before the first request), then keeps each
        one's probe going."""
        async with trio.open_nursery() as first:
            for backend in self.backends:
                first.start_soon(backend.probe)
        task_status.started()
        async with trio.open_nursery() as nursery:
            for backend in self.backends:
                nursery.start_soon(partial(backend.probe_forever, interval_s=interval_s))
