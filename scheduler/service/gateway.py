"""The gateway's request path: authenticate, take quota, schedule, call the backend, learn.

    key -> record (KeyRegistry) -> quota (QuotaGuard, Redis) -> queue (Dispatcher)
        admitted: the model's pool          -> settle the tokens, feed the controller, cache
        shed:     the tier's ladder: cache  -> fallback model with headroom -> 503

Bypass keys skip the quota and the queue (still counted in flight and traced). Every answer,
success or error, carries the quota's rate-limit headers once the quota was decided.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from functools import partial

import trio
from opentelemetry import trace

from backends.http.client import REFUSED_CREDENTIALS
from backends.http.pool import BackendPool
from backends.redis.cache import CacheError
from policies.ladder import CacheState, Step, fallback_has_headroom
from scheduler.core import Admit, Outcome, Request, Sample, Shed, ShedReason
from scheduler.core.backend import Backend
from scheduler.core.cache import Cache, CacheHit
from scheduler.openai.body import InferenceCall
from scheduler.openai.errors import ApiError
from scheduler.openai.sse import check_completion, completion_to_sse, sse_to_completion
from scheduler.service.config import ModelSettings, Settings, TierSettings
from scheduler.service.controls import OpenRequests, RequestControls, request_controls
from scheduler.service.dispatcher import Dispatcher
from scheduler.service.levers import LeversOwner
from scheduler.service.metrics import GatewayMetrics, RequestMeter, RequestOutcome
from scheduler.service.quota import QuotaGuard, QuotaHold, QuotaSettings, Source
from scheduler.service.quota_headers import quota_headers
from scheduler.service.refusals import (
    concurrency_error,
    keys_unavailable,
    quota_error,
    quota_refusal,
    shed_error,
)
from scheduler.service.tenancy import KeyRecord, KeyRegistry, KeysUnavailable
from scheduler.service.upstream import Ended, OnEnd, Reply, Target, call_stream, call_whole

PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "responses": "/v1/responses",
    "embeddings": "/v1/embeddings",
}
# never cached: an answer names an id the backend that made it may be asked about again
# (`previous_response_id`), and a copy from the cache would name one no backend holds
UNCACHED_ROUTES = frozenset({"responses"})
FORWARDED_HEADERS = ("traceparent", "tracestate", "openai-organization", "openai-project")
WRITTEN_MAX = 10_000  # requests whose cache write this replica remembers (`_written_lately`)


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
        cache: Cache | None,
        background: trio.Nursery,
        metrics: GatewayMetrics,
        levers: LeversOwner,
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.pools = pools
        self.registry = registry
        self.quota = quota
        self.cache = cache
        self.metrics = metrics
        self.levers = levers  # the SRE's, live: a lower backend timeout, tenants in bypass
        self._background = background
        self._ids = itertools.count(1)
        self._cache_read = any(Step.CACHE in t.ladder.steps for t in settings.tiers)
        self._written_at: dict[tuple[str, str, bytes], float] = {}  # see `_written_lately`
        self._open = OpenRequests()  # each key's requests open here, for its max_concurrency

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
            raise keys_unavailable() from exc
        if record is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        if record.revoked:
            raise ApiError(401, "This API key has been revoked.", code="invalid_api_key")
        if not any(t.core.name == record.tier for t in self.settings.tiers):
            raise ApiError(403, f"The key's tier {record.tier!r} is not configured here.")
        return record

    def pool_for(self, model: str) -> Backend:
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
        record = self.levers.value.applied_to(record)  # its tenant may be in bypass
        pool = self.pool_for(call.model)
        tier = self.settings.tier(record.tier)
        meter = self.metrics.meter(
            tier=record.tier, route=call.route, model=call.model, now=trio.current_time()
        )
        controls = request_controls(headers, tier, self.settings.tiers)  # a 400 if malformed
        congested = self.dispatcher.core.controller.congested  # health-driven quotas
        quotas = record.quotas(tier.quotas).under_congestion(congested)
        job = Job(record, tier, call, raw, headers, meter, quotas, controls)
        try:
            self._enter(job)
            limit_headers = {} if record.bypass else await self._take_quota(job)
            try:
                reply = await self._schedule(job, pool)
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

    def _enter(self, job: Job) -> None:
        """Count `job` open for its key until its answer ends, or refuse it over the key's
        `max_concurrency` (counted only, for a shadow quota)."""
        key_id, cap = job.record.key_id, job.quotas.max_concurrency
        leave = self._open.enter_nowait(key_id, cap)
        if leave is None and not job.quotas.enforce:
            self.metrics.quota_would_refuse(job.tier.core.name, "key", "concurrency")
            leave = self._open.enter_nowait(key_id, 0)
        if leave is None:
            job.meter.outcome = "refused_quota"
            raise concurrency_error(job.record, job.tier.core.name, cap, self._open.count(key_id))
        job.meter.on_done = leave

    async def _take_quota(self, job: Job) -> dict[str, str]:
        """Take the key's quota for `job` (its hold, to settle at the end); the rate-limit
        headers, or the refusal raised as an ApiError that carries them."""
        record, tier, call = job.record, job.tier, job.call
        shared = self.settings.shared_quotas
        tag = shared.tag(record.tenant)
        verdict = await self.quota.check(
            record.key_id,
            job.quotas,
            tier.fail_mode,
            token_cost=int(call.cost),
            now=trio.current_time(),
            layers=shared.layers(record.tenant, call.model),
            tag=tag,
        )
        if verdict.source in (Source.LOCAL, Source.CLOSED):
            self.metrics.fail_mode_decision(tier.core.name, tier.fail_mode)
        if verdict.allowed:
            reserved = int(call.cost)
            job.hold = self.quota.hold(
                record.key_id, job.quotas, verdict, reserved=reserved, tag=tag
            )
            if verdict.would_refuse:  # a shadow quota: counted and reported, never refused
                why = quota_refusal(verdict, record, tier, reserved, shared)
                self.metrics.quota_would_refuse(tier.core.name, why.layer, why.refusal.reason)
                return quota_headers(verdict, job.quotas, why.refusal)
            return quota_headers(verdict, job.quotas)
        trace.get_current_span().add_event(
            "quota.refused",
            {
                "scheduler.source": verdict.source.value,
                "scheduler.retry_after_s": verdict.retry_after_s,
            },
        )
        redis_down = verdict.source in (Source.CLOSED, Source.UNVERIFIED, Source.MOVING)
        job.meter.outcome = "refused_redis_down" if redis_down else "refused_quota"
        raise quota_error(verdict, record, tier, int(call.cost), shared)

    async def _schedule(self, job: Job, pool: Backend) -> Reply:
        record, call, meter = job.record, job.call, job.meter
        arrival_at = trio.current_time()
        request = Request(
            next(self._ids),
            record.tenant,
            job.controls.tier.core.name,  # its key's tier, or the lower one it asked for
            record.key_id,
            call.model,
            call.cost,
            arrival_at,
            job.controls.deadline_at(arrival_at),
        )
        dispatcher = self.dispatcher
        span = trace.get_current_span()
        span.add_event("queue.enter", {"scheduler.tier": record.tier, "scheduler.cost": call.cost})
        try:
            decision = await dispatcher.wait_decision(
                dispatcher.submit(request, bypass=record.bypass)
            )
        except BaseException:  # the client left while queued: never sent, so given back
            job.settle(used=0, failed=True)
            raise
        if not record.bypass:
            meter.queue_wait_s = decision.queued_s
            admitted, now = isinstance(decision, Admit), trio.current_time()
            self.metrics.queue_decided(
                record.tier, record.key_id, cost=call.cost, admitted=admitted, now=now
            )
        if isinstance(decision, Shed):
            return await self._shed(job, decision)
        span.add_event(
            "queue.admitted",
            {"scheduler.queued_s": decision.queued_s, "scheduler.bypass": record.bypass},
        )
        queued = decision.queued_s > 0
        outcome: RequestOutcome = (
            "bypass" if record.bypass else "queued_admitted" if queued else "admitted"
        )
        meter.outcome = outcome
        on_end = partial(self._ended, job, decision)
        keep_bytes = self._stream_keep_bytes(call)
        return await self._call(job, pool, call.model, job.raw, on_end, keep_bytes=keep_bytes)

    async def _call(
        self,
        job: Job,
        pool: Backend,
        model: str,
        body: bytes,
        on_end: OnEnd,
        *,
        keep_bytes: int = 0,
    ) -> Reply:
        """Send `body` to `model`'s `pool`, whole or streamed as the client asked."""
        call, server = job.call, self.settings.server
        target = Target(
            pool,
            PATHS[call.route],
            model,
            self.levers.value.timeout_s(server.request_timeout_s),  # lowered by an SRE?
            keep_bytes,
            server.first_byte_timeout_s,
        )
        call_backend = call_stream if call.stream else call_whole
        forward = _forwarded(job.headers)
        return await call_backend(target, body, forward, call.prompt_tokens, on_end)

    def _ended(self, job: Job, admit: Admit, ended: Ended) -> None:
        """The admitted call's end: the gate's slot back, the quota settled, the answer cached."""
        if ended.outcome is Outcome.IGNORED:
            self.dispatcher.finish(admit.ticket, None)
        else:
            sample = Sample(ended.latency_s, ended.outcome, ended.ttft_s, ended.output_tokens)
            self.dispatcher.finish(admit.ticket, sample)
        job.settle_ended(ended)
        if ended.body:
            self._cache_put(job, ended.body)
        job.meter.backend_done(model=job.call.model, error=ended.error, now=trio.current_time())

    # -- the shed ladder -----------------------------------------------------------------------

    def _scope(self, record: KeyRecord, model: ModelSettings | None) -> str:
        if model is not None and model.shared_cache:
            return f"shared:{model.name}"
        return f"tenant:{record.tenant}"

    def _caching(self, call: InferenceCall) -> tuple[Cache, ModelSettings] | None:
        """The cache and the model, if this call's answer is to be cached: not when no tier's
        ladder has a cache step (nothing would ever read it), nor on an uncached route."""
        if call.route in UNCACHED_ROUTES:
            return None
        model = self.settings.model(call.model)
        cache = self.cache
        if cache is None or model is None or model.cache_fresh_s <= 0 or not self.quota.redis_up:
            return None
        if not self._cache_read:
            return None
        return cache, model

    def _written_lately(self, written: tuple[str, str, bytes], within_s: float) -> bool:
        """Whether this replica stored an answer to these very request bytes (`written`: the
        scope, the route and the body's digest) within `within_s`: then its entry is still
        fresh, and a hot prompt is not written again on every answer."""
        written_at = self._written_at.get(written)
        return written_at is not None and trio.current_time() - written_at < within_s

    def _note_written(self, written: tuple[str, str, bytes]) -> None:
        self._written_at.pop(written, None)  # re-inserted last: the order is of writes
        if len(self._written_at) >= WRITTEN_MAX:  # the older half goes: memory stays bounded
            self._written_at = dict(list(self._written_at.items())[WRITTEN_MAX // 2 :])
        self._written_at[written] = trio.current_time()

    def _stream_keep_bytes(self, call: InferenceCall) -> int:
        """How much of a streamed answer to keep for the cache (0: none)."""
        caching = self._caching(call)
        if caching is None or not call.stream or call.route == "embeddings":
            return 0
        if call.body.get("logprobs") not in (None, False):
            return 0  # a joined stream keeps no logprobs: its entry would answer without them
        return caching[0].max_bytes

    def _cache_put(self, job: Job, body: bytes) -> None:
        """Store a whole answer, or the completion a streamed one's events add up to; not
        again if this replica stored the same request (the same bytes) within a tenth of its
        freshness (`_written_lately`)."""
        call = job.call
        caching = self._caching(call)
        if caching is None:
            return
        cache, model = caching
        scope = self._scope(job.record, model)
        written = (scope, call.route, hashlib.sha256(job.raw).digest())
        if self._written_lately(written, model.cache_fresh_s / 10):
            return
        try:  # only a well-formed answer: never an HTML page, a stream cut short, ...
            if call.stream:
                body = sse_to_completion(PATHS[call.route], body)
            check_completion(PATHS[call.route], body)
        except Exception:  # not a whole answer (this runs in `on_end`: no raise)
            return
        self._note_written(written)

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

    async def _shed(self, job: Job, shed: Shed) -> Reply:
        """The tier's ladder for a shed request; the quota back unless a fallback call (which
        settles when it ends) answers."""
        trace.get_current_span().add_event(
            "queue.shed",
            {"scheduler.reason": shed.reason.value, "scheduler.queued_s": shed.queued_s},
        )
        try:
            reply = await self._walk_ladder(job, shed)
        except BaseException:  # no answer (a 503, or the client left): given back too
            if job.meter.outcome != "shed_fallback":  # a fallback call settles when it ends
                job.settle(used=0, failed=True)
            raise
        if job.meter.outcome != "shed_fallback":  # a cached answer: no tokens used
            job.settle(used=0, failed=False)
        return reply

    async def _walk_ladder(self, job: Job, shed: Shed) -> Reply:
        call, tier, meter = job.call, job.tier, job.meter
        model = self.settings.model(call.model)
        # a draining replica answers nothing more (no cache, no fallback): its 503 sends the
        # client, and the load balancer, to another replica
        steps = () if shed.reason is ShedReason.DRAINING else tier.ladder.steps
        hit = await self._cache_get(job, model) if Step.CACHE in steps else None
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
            return await self._fallback(job, fallback, shed_header)
        meter.outcome = "refused_overload"
        core = self.dispatcher.core
        queued_in = job.controls.tier  # whose bounds shed it: the tier it queued as
        raise shed_error(shed, queued_in, core.statistics(), core.controller)

    async def _cache_get(self, job: Job, model: ModelSettings | None) -> CacheHit | None:
        call = job.call
        uncached = call.route in UNCACHED_ROUTES or (call.stream and call.route == "embeddings")
        if self.cache is None or uncached:
            return None
        try:
            return await self.cache.get(
                self._scope(job.record, model), PATHS[call.route], call.body, now_unix=time.time()
            )
        except CacheError:
            return None

    def _fallback_pool(self, model: ModelSettings | None) -> tuple[ModelSettings, Backend] | None:
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
        self, job: Job, fallback: tuple[ModelSettings, Backend], extra: dict[str, str]
    ) -> Reply:
        target, pool = fallback
        call = job.call
        body = json.dumps({**call.body, "model": target.name}).encode()
        extra = {**extra, "x-scheduler-degraded": f"fallback:{target.name}"}

        def on_end(ended: Ended) -> None:  # outside the gate: nothing to release
            job.settle_ended(ended)
            job.meter.backend_done(model=target.name, error=ended.error, now=trio.current_time())

        reply = await self._call(job, pool, target.name, body, on_end)
        reply.headers.update(extra)
        return reply


@dataclass(slots=True)
class Job:
    """One request on its way through the gateway: who asks, what, how it is measured, and the
    quota it holds until its call ends."""

    record: KeyRecord
    tier: TierSettings
    call: InferenceCall
    raw: bytes
    headers: dict[str, str]
    meter: RequestMeter
    quotas: QuotaSettings  # the key's, worked out once
    controls: RequestControls  # how it queues: its tier, or lower, as it asked
    hold: QuotaHold | None = None  # None: bypass, unlimited, or nothing taken

    def settle(self, *, used: int, failed: bool) -> None:
        if self.hold is not None:
            self.hold.settle(used=used, failed=failed, now=trio.current_time())

    def settle_ended(self, ended: Ended) -> None:
        """Settle by how the backend call ended (README "Quotas"):

        - the client went away after the call was sent: the backend worked on it, so it keeps
          its request unit and the tokens produced (a stream's, counted so far) or, when that
          is unknown (a whole answer never read), its reservation;
        - the backends failed it (no answer, 429, 5xx) or refused the gateway's own key
          (401, 403, 407: a 502 `backend_auth`): everything back (DESIGN §2.6);
        - any other answer: the tokens a 2xx used, none for the backend's own 4xx.
        """
        call = self.call
        used = ended.total_tokens
        if used is None:
            used = call.prompt_tokens + ended.output_tokens
        if ended.abandoned:
            self.settle(used=used if call.stream else int(call.cost), failed=False)
            return
        status = ended.status
        failed = status in (0, 429) or status >= 500 or status in REFUSED_CREDENTIALS
        ok = 200 <= ended.status < 300
        self.settle(used=used if ok else 0, failed=failed)


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
