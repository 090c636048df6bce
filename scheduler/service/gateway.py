"""The gateway's request path: authenticate, schedule, call the backend, learn.

Why the stream is an async generator primed before it is returned: the upstream call (and
the admission ticket) must be released whatever the client does. A generator that has
started is closed by trio's finaliser even if the web framework never iterates it again, so
the handler starts it (it opens the upstream call and yields the status) before handing it
to the response.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from backends.http import BackendError, BackendPool, BackendTimeout, BackendUnavailable, Upstream
from scheduler.core import Admit, Outcome, Request, Sample, Shed, ShedReason, Ticket
from scheduler.service.config import KeySettings, Settings, key_id
from scheduler.service.dispatcher import Dispatcher
from scheduler.service.errors import ApiError, overloaded
from scheduler.service.openai_body import InferenceCall

PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}
SATURATED = frozenset({429, 503})
FORWARDED_HEADERS = ("traceparent", "tracestate", "openai-organization", "openai-project")
SHED_RETRY_AFTER_S = {
    ShedReason.DEADLINE: 2.0,
    ShedReason.QUEUE_FULL: 1.0,
    ShedReason.OVERLOAD: 1.0,
    ShedReason.DRAINING: 5.0,
}


@dataclass(frozen=True, slots=True)
class Reply:
    """A response ready to send: a whole body, or a primed stream."""

    status: int
    headers: dict[str, str]
    body: bytes | AsyncIterator[bytes]


class Gateway:
    """Everything one replica needs to serve a request; one per process."""

    def __init__(
        self, settings: Settings, dispatcher: Dispatcher, pools: dict[str, BackendPool]
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.pools = pools
        self._keys = {k.key_id: k for k in settings.keys}
        self._ids = itertools.count(1)

    def authenticate(self, authorization: str | None) -> KeySettings:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(
                401,
                "You didn't provide an API key. Use the Authorization header: "
                "'Authorization: Bearer YOUR_KEY'.",
                code="missing_api_key",
            )
        key = self._keys.get(key_id(authorization[7:].strip(), self.settings.key_secret))
        if key is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key

    def pool_for(self, model: str) -> BackendPool:
        pool = self.pools.get(model)
        if pool is None:
            raise ApiError(
                404,
                f"The model '{model}' does not exist or you do not have access to it.",
                code="model_not_found",
                param="model",
            )
        return pool

    async def serve(
        self, key: KeySettings, call: InferenceCall, raw: bytes, headers: dict[str, str]
    ) -> Reply:
        """Schedule `call` and carry it to the backend; raises ApiError for any refusal."""
        pool = self.pool_for(call.model)
        now = trio.current_time()
        request = Request(
            next(self._ids), key.tenant, key.tier, key.key_id, call.model, call.cost, now
        )
        dispatcher = self.dispatcher
        decision = await dispatcher.wait_decision(dispatcher.submit(request, bypass=key.bypass))
        if isinstance(decision, Shed):
            raise self._shed_error(decision)
        forward = {k: v for k, v in headers.items() if k in FORWARDED_HEADERS}
        forward["content-type"] = "application/json"
        if call.stream:
            return await self._stream(pool, decision, call, raw, forward)
        return await self._whole(pool, decision, call, raw, forward)

    def _shed_error(self, shed: Shed) -> ApiError:
        reason = shed.reason
        messages = {
            ShedReason.DEADLINE: "The request waited too long in the queue; the service is busy.",
            ShedReason.QUEUE_FULL: "The service's queue for your tier is full.",
            ShedReason.OVERLOAD: "The service is overloaded; lower tiers are shed first.",
            ShedReason.DRAINING: "This replica is shutting down.",
        }
        return overloaded(messages[reason], SHED_RETRY_AFTER_S[reason])

    def _end(self, ticket: Ticket, outcome: Outcome, started_at: float, **sample: float) -> None:
        if outcome is Outcome.IGNORED:
            self.dispatcher.finish(ticket, None)
            return
        latency = trio.current_time() - started_at
        ttft = sample.get("ttft_s")
        tokens = int(sample.get("output_tokens", 0))
        self.dispatcher.finish(ticket, Sample(latency, outcome, ttft, tokens))

    async def _whole(
        self,
        pool: BackendPool,
        admit: Admit,
        call: InferenceCall,
        raw: bytes,
        headers: dict[str, str],
    ) -> Reply:
        started_at = trio.current_time()
        outcome = Outcome.IGNORED
        tokens = 0
        try:
            async with pool.post(
                PATHS[call.route],
                raw,
                headers,
                stream=False,
                timeout_s=self.settings.server.request_timeout_s,
            ) as up:
                body = await up.read()
                outcome, error = _judge(up)
                if error is not None:
                    raise error
                tokens = _completion_tokens(body)
                return Reply(up.status_code, up.headers(), body)
        except BackendError as exc:
            outcome = (
                Outcome.DROPPED
                if isinstance(exc, BackendTimeout | BackendUnavailable)
                else Outcome.IGNORED
            )
            raise _backend_error(exc) from exc
        finally:
            self._end(admit.ticket, outcome, started_at, output_tokens=tokens)

    async def _stream(
        self,
        pool: BackendPool,
        admit: Admit,
        call: InferenceCall,
        raw: bytes,
        headers: dict[str, str],
    ) -> Reply:
        chunks = self._stream_chunks(pool, admit, call, raw, headers)
        first = await chunks.__anext__()  # opens the upstream call; see the module docstring
        status, upstream_headers = json.loads(first)
        return Reply(status, upstream_headers, chunks)

    async def _stream_chunks(
        self,
        pool: BackendPool,
        admit: Admit,
        call: InferenceCall,
        raw: bytes,
        headers: dict[str, str],
    ) -> AsyncIterator[bytes]:
        started_at = trio.current_time()
        outcome, ttft, events = Outcome.IGNORED, math.nan, 0
        try:
            async with pool.post(
                PATHS[call.route], raw, headers, timeout_s=self.settings.server.request_timeout_s
            ) as up:
                outcome, error = _judge(up)
                if error is not None:
                    await up.read()
                    raise error
                outcome = Outcome.IGNORED  # until the stream ends well
                yield json.dumps([up.status_code, up.headers()]).encode()
                async for chunk in up.chunks():
                    if math.isnan(ttft):
                        ttft = trio.current_time() - started_at
                    events += chunk.count(b"data:")
                    yield chunk
                outcome = Outcome.COMPLETED
        except BackendError as exc:
            if isinstance(exc, BackendTimeout | BackendUnavailable):
                outcome = Outcome.DROPPED
            if math.isnan(ttft) and events == 0:
                raise _backend_error(exc) from exc
            # headers are gone already: end the stream with an SSE error event
            yield b"data: " + _backend_error(exc).body() + b"\n\n"
        finally:
            sample = {"output_tokens": float(max(0, events - 1))}
            if not math.isnan(ttft):
                sample["ttft_s"] = ttft
            self._end(admit.ticket, outcome, started_at, **sample)


def _judge(up: Upstream) -> tuple[Outcome, ApiError | None]:
    """How a backend status counts for the controller, and what the client gets instead."""
    status = up.status_code
    if status < 400:
        return Outcome.COMPLETED, None
    if status in SATURATED:
        return Outcome.DROPPED, overloaded("The model's backends are saturated.", 1.0)
    if status < 500:
        return Outcome.IGNORED, None  # the backend's own 4xx is passed through as is
    return Outcome.IGNORED, ApiError(
        502, f"The backend failed with status {status}.", type="server_error", code="bad_gateway"
    )


def _backend_error(exc: BackendError) -> ApiError:
    if isinstance(exc, BackendTimeout):
        return ApiError(
            504, "The backend did not answer in time.", type="server_error", code="timeout"
        )
    if isinstance(exc, BackendUnavailable):
        return overloaded("No backend is available for this model right now.", 2.0)
    return ApiError(
        502, "The backend's response broke off.", type="server_error", code="bad_gateway"
    )


def _completion_tokens(body: bytes) -> int:
    try:
        usage = json.loads(body).get("usage") or {}
        return int(usage.get("completion_tokens") or 0)
    except (ValueError, AttributeError, TypeError):
        return 0
