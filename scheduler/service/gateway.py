"""The gateway's request path: authenticate, take quota, schedule, call the backend, learn.

    key -> record (KeyRegistry) -> quota (QuotaGuard, Redis) -> queue (Dispatcher)
        admitted: the model's pool          -> settle the tokens, feed the controller, cache
        shed:     the tier's ladder: cache  -> fallback model with headroom -> 503

Bypass keys skip the quota and the queue (still counted in flight and traced). Every answer,
success or error, carries the quota's rate-limit headers once the quota was decided.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import AsyncGenerator
from functools import partial

import trio
from opentelemetry import trace

from backends.http.pool import BackendPool
from backends.redis.cache import CacheError, CacheHit, ResponseCache
from policies.ladder import CacheState, Step, fallback_has_headroom
from scheduler.core import Admit, Outcome, Request, Sample, Shed, ShedReason
from scheduler.core.quota_store import Reservation
from scheduler.openai.body import InferenceCall
from scheduler.openai.errors import ApiError, overloaded
from scheduler.openai.sse import check_completion, completion_to_sse, sse_to_completion
from scheduler.service.config import ModelSettings, Settings, TierSettings
from scheduler.service.dispatcher import Dispatcher
from scheduler.service.metrics import GatewayMetrics, RequestMeter, RequestOutcome
from scheduler.service.quota import QuotaGuard, Source, Verdict, rate_limit_headers
from scheduler.service.tenancy import KeyRecord, KeyRegistry, KeysUnavailable
from scheduler.service.upstream import Ended, OnEnd, Reply, Target, call_stream, call_whole

PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}
FORWARDED_HEADERS = ("traceparent", "tracestate", "openai-organization", "openai-project")
SHED_MESSAGES = {
    ShedReason.DEADLINE: ("The request waited too long in the queue; the service is busy.", 2.0),
    ShedReason.QUEUE_FULL: ("The service's queue for your tier is full.", 1.0),
    ShedReason.OVERLOAD: ("The service is overloaded; lower tiers are shed first.", 1.0),
    ShedReason.DRAINING: ("This replica is draining: retry on another.", 5.0),
}


class Gateway:
    """Everything one replica needs to serve a request; one per process."""

    def __init__(
        self,
        settings: Settings,
        dispatcher: Dispatcher,
        pools: dict[str, BackendPool],
        *,
        registry: KeyRegistry,
        quota: QuotaGuard,
        cache: ResponseCache | None,
        background: trio.Nursery,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.pools = pools
        self.registry = registry
        self.quota = quota
        self.cache = cache
        self.metrics = metrics
        self._background = background
        self._ids = itertools.count(1)

    async def authenticate(self, authorization: str | None) -> KeyRecord:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(
                401,
                "You didn't provide an API key. Use the Authorization header: "
                "'Authorization: Bearer YOUR_KEY'.",
                code="missing_api_key",
            )
        kid = self.registry.key_id(authorization[7:].strip())
        try:
            record = await self.registry.lookup(kid, now=trio.current_time())
        except KeysUnavailable as exc:
            raise overloaded("Your API key could not be checked; retry shortly.", 1.0) from exc
        if record is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        if record.revoked:
            raise ApiError(401, "This API key has been revoked.", code="invalid_api_key")
        if not any(t.core.name == record.tier for t in self.settings.tiers):
            raise ApiError(403, f"The key's tier {record.tier!r} is not configured here.")
        return record

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
        self, record: KeyRecord, call: InferenceCall, raw: bytes, headers: dict[str, str]
    ) -> Reply:
        """Answer `call`; raises ApiError (with the rate-limit headers) for any refusal."""
        pool = self.pool_for(call.model)
        tier = self.settings.tier(record.tier)
        meter = self.metrics.meter(
            tier=record.tier, route=call.route, model=call.model, now=trio.current_time()
        )
        try:
            verdict = None if record.bypass else await self._take_quota(record, tier, call, meter)
            limit_headers = {} if verdict is None else rate_limit_headers(verdict)
            try:
                reply = await self._schedule(record, tier, call, pool, raw, headers, verdict, meter)
            except ApiError as error:
                error.extra_headers.update(limit_headers)
                raise
        except BaseException:
            meter.fail(now=trio.current_time())
            raise
        reply.headers.update(limit_headers)
        if isinstance(reply.body, bytes) or meter.outcome == "shed_cache":
            meter.done(now=trio.current_time())  # a backend stream reports from its on_end
        return reply

    async def _take_quota(
        self, record: KeyRecord, tier: TierSettings, call: InferenceCall, meter: RequestMeter
    ) -> Verdict:
        verdict = await self.quota.check(
            record.key_id,
            record.quotas(tier.quotas),
            tier.fail_mode,
            token_cost=int(call.cost),
            now=trio.current_time(),
        )
        if verdict.source in (Source.LOCAL, Source.CLOSED):
            self.metrics.fail_mode_decision(tier.core.name, tier.fail_mode)
        if verdict.allowed:
            return verdict
        trace.get_current_span().add_event(
            "quota.refused",
            {
                "scheduler.source": verdict.source.value,
                "scheduler.retry_after_s": verdict.retry_after_s,
            },
        )
        if verdict.source in (Source.CLOSED, Source.UNVERIFIED):
            meter.outcome = "refused_redis_down"
            raise overloaded(
                "Your quota could not be checked; retry shortly.", verdict.retry_after_s
            )
        meter.outcome = "refused_quota"
        message = "Rate limit reached for your API key. Retry after the time in Retry-After."
        retry_after_s = verdict.retry_after_s
        tokens = verdict.tokens
        if tokens is not None and not tokens.allowed and math.isinf(tokens.retry_after_s):
            message = (
                f"Request too large: it may use {int(call.cost)} tokens (prompt estimate plus "
                f"max_tokens) but the key's token quota is {tokens.limit} per "
                f"{verdict.period_s:g} s. Lower max_tokens or the prompt."
            )
            retry_after_s = verdict.period_s
        error = ApiError(
            429,
            message,
            type="tokens" if tokens is not None and not tokens.allowed else "requests",
            code="rate_limit_exceeded",
            retry_after_s=min(retry_after_s, 86_400.0),
        )
        error.extra_headers.update(rate_limit_headers(verdict))
        raise error

    async def _schedule(
        self,
        record: KeyRecord,
        tier: TierSettings,
        call: InferenceCall,
        pool: BackendPool,
        raw: bytes,
        headers: dict[str, str],
        verdict: Verdict | None,
        meter: RequestMeter,
    ) -> Reply:
        now = trio.current_time()
        request = Request(
            next(self._ids), record.tenant, record.tier, record.key_id, call.model, call.cost, now
        )
        dispatcher = self.dispatcher
        span = trace.get_current_span()
        span.add_event("queue.enter", {"scheduler.tier": record.tier, "scheduler.cost": call.cost})
        try:
            decision = await dispatcher.wait_decision(
                dispatcher.submit(request, bypass=record.bypass)
            )
        except BaseException:  # the client left while queued: never sent, so given back
            self._settle(record, tier, verdict, call, used=0, failed=True)
            raise
        if not record.bypass:
            meter.queue_wait_s = decision.queued_s
        if isinstance(decision, Shed):
            span.add_event(
                "queue.shed",
                {
                    "scheduler.reason": decision.reason.value,
                    "scheduler.queued_s": decision.queued_s,
                },
            )
            settle_fallback = partial(self._settle_ended, record, tier, verdict, call)
            try:
                reply = await self._walk_ladder(
                    decision, record, tier, call, raw, headers, meter, settle_fallback
                )
            except BaseException:  # no answer (a 503, or the client left): given back too
                if meter.outcome != "shed_fallback":  # a fallback call settles when it ends
                    self._settle(record, tier, verdict, call, used=0, failed=True)
                raise
            if meter.outcome != "shed_fallback":  # a cached answer: no tokens used
                self._settle(record, tier, verdict, call, used=0, failed=False)
            return reply
        span.add_event(
            "queue.admitted",
            {"scheduler.queued_s": decision.queued_s, "scheduler.bypass": record.bypass},
        )
        queued = decision.queued_s > 0
        outcome: RequestOutcome = (
            "bypass" if record.bypass else "queued_admitted" if queued else "admitted"
        )
        meter.outcome = outcome
        forward = _forwarded(headers)
        on_end = self._on_end(decision, record, tier, call, verdict, meter)
        timeout_s = self.settings.server.request_timeout_s
        keep_bytes = self._stream_keep_bytes(call)
        first_byte_s = self.settings.server.first_byte_timeout_s
        target = Target(pool, PATHS[call.route], call.model, timeout_s, keep_bytes, first_byte_s)
        if call.stream:
            return await call_stream(target, raw, forward, call.prompt_tokens, on_end)
        return await call_whole(target, raw, forward, call.prompt_tokens, on_end)

    def _on_end(
        self,
        admit: Admit,
        record: KeyRecord,
        tier: TierSettings,
        call: InferenceCall,
        verdict: Verdict | None,
        meter: RequestMeter,
    ) -> OnEnd:
        def on_end(ended: Ended) -> None:
            if ended.outcome is Outcome.IGNORED:
                self.dispatcher.finish(admit.ticket, None)
            else:
                sample = Sample(ended.latency_s, ended.outcome, ended.ttft_s, ended.output_tokens)
                self.dispatcher.finish(admit.ticket, sample)
            self._settle_ended(record, tier, verdict, call, ended)
            if ended.body:
                self._cache_put(record, call, ended.body)
            meter.backend_done(model=call.model, error=ended.error, now=trio.current_time())

        return on_end

    def _settle_ended(
        self,
        record: KeyRecord,
        tier: TierSettings,
        verdict: Verdict | None,
        call: InferenceCall,
        ended: Ended,
    ) -> None:
        """Settle an admitted request by how its backend call ended (README "Quotas"):

        - the client went away after the call was sent: the backend worked on it, so it keeps
          its request unit and the tokens produced (a stream's, counted so far) or, when that
          is unknown (a whole answer never read), its reservation;
        - the backends failed it (no answer, 429, 5xx): everything back (DESIGN §2.6);
        - any other answer: the tokens a 2xx used, none for the backend's own 4xx.
        """
        used = ended.total_tokens
        if used is None:
            used = call.prompt_tokens + ended.output_tokens
        if ended.abandoned:
            used = used if call.stream else int(call.cost)
            self._settle(record, tier, verdict, call, used=used, failed=False)
            return
        failed = ended.status == 0 or ended.status == 429 or ended.status >= 500
        ok = 200 <= ended.status < 300
        self._settle(record, tier, verdict, call, used=used if ok else 0, failed=failed)

    def _settle(
        self,
        record: KeyRecord,
        tier: TierSettings,
        verdict: Verdict | None,
        call: InferenceCall,
        *,
        used: int,
        failed: bool,
    ) -> None:
        """Give back the tokens reserved at admission that the response did not use and, when
        the backends `failed`, the request too."""
        if verdict is None or not verdict.allowed:
            return
        quotas = record.quotas(tier.quotas)
        if verdict.source is Source.LOCAL:
            self.quota.settle_local(
                record.key_id,
                quotas,
                reserved=int(call.cost),
                used=used,
                failed=failed,
                now=trio.current_time(),
            )
            return
        store = self.quota.store
        if verdict.source is not Source.REDIS or store is None:
            return
        requests, tokens = quotas.specs()
        reservation = Reservation(
            record.key_id, requests, tokens, int(call.cost), verdict.credits_spent
        )

        async def settle() -> None:
            try:
                await reservation.settle(store, used=used, failed=failed)
            except Exception:  # the reservation then expires with its window
                self.quota.redis_errors += 1

        self._background.start_soon(settle)

    # -- the shed ladder -----------------------------------------------------------------------

    def _scope(self, record: KeyRecord, model: ModelSettings | None) -> str:
        if model is not None and model.shared_cache:
            return f"shared:{model.name}"
        return f"tenant:{record.tenant}"

    def _caching(self, call: InferenceCall) -> tuple[ResponseCache, ModelSettings] | None:
        """The cache and the model, if this call's answer is to be cached."""
        model = self.settings.model(call.model)
        cache = self.cache
        if cache is None or model is None or model.cache_fresh_s <= 0 or not self.quota.redis_up:
            return None
        return cache, model

    def _stream_keep_bytes(self, call: InferenceCall) -> int:
        """How much of a streamed answer to keep for the cache (0: none)."""
        caching = self._caching(call)
        if caching is None or not call.stream or call.route == "embeddings":
            return 0
        if call.body.get("logprobs") not in (None, False):
            return 0  # a joined stream keeps no logprobs: its entry would answer without them
        return caching[0].max_bytes

    def _cache_put(self, record: KeyRecord, call: InferenceCall, body: bytes) -> None:
        """Store a whole answer, or the completion a streamed one's events add up to."""
        caching = self._caching(call)
        if caching is None:
            return
        cache, model = caching
        try:  # only a well-formed answer: never an HTML page, a stream cut short, ...
            if call.stream:
                body = sse_to_completion(PATHS[call.route], body)
            check_completion(PATHS[call.route], body)
        except Exception:  # not a whole answer (this runs in `on_end`: no raise)
            return
        scope = self._scope(record, model)

        async def put() -> None:
            with contextlib.suppress(CacheError):
                await cache.put(
                    scope,
                    PATHS[call.route],
                    call.body,
                    body,
                    fresh_s=model.cache_fresh_s,
                    stale_s=model.cache_stale_s,
                    now_unix=time.time(),
                )

        self._background.start_soon(put)

    async def _walk_ladder(
        self,
        shed: Shed,
        record: KeyRecord,
        tier: TierSettings,
        call: InferenceCall,
        raw: bytes,
        headers: dict[str, str],
        meter: RequestMeter,
        settle: OnEnd,
    ) -> Reply:
        model = self.settings.model(call.model)
        # a draining replica answers nothing more (no cache, no fallback): its 503 sends the
        # client, and the load balancer, to another replica
        steps = () if shed.reason is ShedReason.DRAINING else tier.ladder.steps
        hit = await self._cache_get(record, call, model) if Step.CACHE in steps else None
        events: list[bytes] | None = None
        if hit is not None and call.stream:
            try:
                events = completion_to_sse(PATHS[call.route], hit.body)
            except ValueError:  # not a completion that can be replayed as a stream: a miss
                hit = None
        cache_state = (
            CacheState.MISS if hit is None else CacheState.STALE if hit.stale else CacheState.FRESH
        )
        fallback = self._fallback_pool(model) if steps else None
        step = tier.ladder.choose(cache=cache_state, fallback_has_headroom=fallback is not None)
        trace.get_current_span().add_event(
            "ladder.step", {"scheduler.step": step.value, "scheduler.cache": cache_state.value}
        )
        shed_header = {"x-scheduler-shed": shed.reason.value}
        if step is Step.CACHE and hit is not None:
            extra = {**shed_header, "x-scheduler-cache": "stale" if hit.stale else "fresh"}
            extra["age"] = str(int(hit.age_s))
            meter.outcome = "shed_cache"
            if events is None:
                return Reply(200, {"content-type": hit.content_type, **extra}, hit.body)
            return Reply(200, {"content-type": "text/event-stream", **extra}, _events(events))
        if step is Step.FALLBACK and fallback is not None and model is not None:
            meter.outcome = "shed_fallback"
            return await self._fallback(fallback, call, headers, shed_header, meter, settle)
        meter.outcome = "refused_overload"
        message, retry_after_s = SHED_MESSAGES[shed.reason]
        error = overloaded(message, retry_after_s)
        error.extra_headers.update(shed_header)
        raise error

    async def _cache_get(
        self, record: KeyRecord, call: InferenceCall, model: ModelSettings | None
    ) -> CacheHit | None:
        if self.cache is None or (call.stream and call.route == "embeddings"):
            return None
        try:
            return await self.cache.get(
                self._scope(record, model), PATHS[call.route], call.body, now_unix=time.time()
            )
        except CacheError:
            return None

    def _fallback_pool(
        self, model: ModelSettings | None
    ) -> tuple[ModelSettings, BackendPool] | None:
        if model is None or model.fallback is None:
            return None
        target = self.settings.model(model.fallback)
        pool = self.pools.get(model.fallback)
        if target is None or pool is None:
            return None
        if not fallback_has_headroom(
            any_healthy=pool.any_healthy, inflight=pool.inflight, max_inflight=target.max_inflight
        ):
            return None
        return target, pool

    async def _fallback(
        self,
        fallback: tuple[ModelSettings, BackendPool],
        call: InferenceCall,
        headers: dict[str, str],
        extra: dict[str, str],
        meter: RequestMeter,
        settle: OnEnd,
    ) -> Reply:
        target, pool = fallback
        body = json.dumps({**call.body, "model": target.name}).encode()
        forward = _forwarded(headers)
        server = self.settings.server
        to = Target(
            pool,
            PATHS[call.route],
            target.name,
            server.request_timeout_s,
            first_byte_timeout_s=server.first_byte_timeout_s,
        )
        extra = {**extra, "x-scheduler-degraded": f"fallback:{target.name}"}

        def on_end(ended: Ended) -> None:  # outside the gate: nothing to release
            settle(ended)
            meter.backend_done(model=target.name, error=ended.error, now=trio.current_time())

        if call.stream:
            reply = await call_stream(to, body, forward, call.prompt_tokens, on_end)
        else:
            reply = await call_whole(to, body, forward, call.prompt_tokens, on_end)
        reply.headers.update(extra)
        return reply


def _forwarded(headers: dict[str, str]) -> dict[str, str]:
    """The client headers the backend gets: trace context and OpenAI's organisation fields,
    only when they are plain printable ASCII (anything else would not survive the trip)."""
    forward = {
        k: v
        for k, v in headers.items()
        if k in FORWARDED_HEADERS and v.isascii() and v.isprintable()
    }
    forward["content-type"] = "application/json"
    return forward


async def _events(events: list[bytes]) -> AsyncGenerator[bytes, None]:
    for event in events:
        yield event
