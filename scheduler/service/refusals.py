"""Every 429 and 503 of the request path, explained (README "Rejections").

Why one module: a refusal names the knob that decided, where it stands and what was measured
against it. That table, from each cause to its knob, is written once, here; the gateway and
the upstream call only say which cause it was, and `scheduler.openai.errors.refused` makes the
answer. `SHED` has an entry for every `ShedReason` (a test holds it to that), so a new way
of shedding cannot ship unexplained.

    cause                          status  reason                limit (knob)
    over a key's quota             429     requests | tokens     tiers.T.quota.requests, ...
    over its tenant's or model's   429     requests | tokens     tenants.T.quota.requests,
                                                                 models.M.quota.tokens, ...
    a request no quota can hold    429     tokens_too_large      tiers.T.quota.tokens
    a key's requests open at once  429     concurrency           tiers.T.quota.max_concurrency
    Redis out, fail mode closed    503     redis_unavailable     tiers.T.fail_mode
    Redis slow, not known down     503     redis_unverified      redis.down_after_s
    the key's slot moving          503     redis_slot_moving     redis.cluster
    the key not checkable          503     keys_unavailable      redis.timeout_s
    shed from the queue            503     deadline | queue_full | overload | draining
    the backends saturated         503     backend_saturated     models.M.backends
    no backend reachable           503     backend_unavailable   models.M.backends
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from policies.ratelimit import RateDecision
from scheduler.core import AIMDController, Controller, SchedulerStats, Shed, ShedReason
from scheduler.core.quota_store import LayerName, QuotaLayer
from scheduler.openai.errors import ApiError, Refusal, refused
from scheduler.service.config import TierSettings
from scheduler.service.controls import MAX_WAIT_HEADER
from scheduler.service.quota import DOWN_AFTER_S, Source, Verdict
from scheduler.service.quota_headers import rate_limit_headers
from scheduler.service.quota_layers import SharedQuotas
from scheduler.service.tenancy import KeyRecord


def quota_knob(record: KeyRecord, tier: str, name: str) -> str:
    """Where the key's `name` quota ("requests", "tokens") comes from: a live upgrade, the
    key's own override, or its tier's table (the order `KeyRecord.quotas` applies them)."""
    if any(field == name for field, _ in record.upgrade):
        return f"key.upgrade.{name}"
    if any(field == name for field, _ in record.override):
        return f"key.quota_override.{name}"
    return f"tiers.{tier}.quota.{name}"


NO_SHARED = SharedQuotas()


class QuotaRefusal(NamedTuple):
    """A quota's refusal explained: what the answer says, and which layer refused, named as
    `x-ratelimit-layer-*` names it (Redis out or slow refuses by the key's tier: "key")."""

    refusal: Refusal
    message: str
    retry_after_s: float
    layer: LayerName = "key"


def quota_refusal(
    verdict: Verdict,
    record: KeyRecord,
    tier: TierSettings,
    cost: int,
    shared: SharedQuotas = NO_SHARED,
) -> QuotaRefusal:
    """Why the quota refused (or, for a shadow quota, would refuse) a request of `cost`
    tokens. With `shared` layers, the binding one: of the refusing quotas (enforced ones; for
    a shadow's, the shadow ones), the one with the longest wait, the key's own first on a
    tie."""
    name = tier.core.name
    source = verdict.source
    if source is Source.CLOSED:
        refusal = Refusal(
            "redis_unavailable", f"tiers.{name}.fail_mode", observed=verdict.failing_s
        )
        message = "Your quota could not be checked (Redis is failing); retry shortly."
        return QuotaRefusal(refusal, message, verdict.retry_after_s)
    if source is Source.UNVERIFIED:
        refusal = Refusal("redis_unverified", "redis.down_after_s", DOWN_AFTER_S, verdict.failing_s)
        return QuotaRefusal(refusal, "Your quota could not be checked in time; retry shortly.", 1.0)
    if source is Source.MOVING:
        refusal = Refusal("redis_slot_moving", "redis.cluster")
        message = "Your quota's Redis slot is moving between nodes; retry shortly."
        return QuotaRefusal(refusal, message, 1.0)
    binding = _binding(verdict, record.quotas(tier.quotas).enforce)
    if binding is not None and binding[0] is not None:
        return _over_shared(verdict, shared, binding[0], binding[1], binding[2], cost)
    return _over_quota(verdict, record, tier, cost)


def _binding(
    verdict: Verdict, own_enforced: bool
) -> tuple[QuotaLayer | None, str, RateDecision] | None:
    """The refusing quota that binds (None for the layer: the key's own), or None."""
    shadow = verdict.would_refuse
    found: list[tuple[QuotaLayer | None, str, RateDecision]] = []
    if own_enforced != shadow:
        for which, d in (("tokens", verdict.tokens), ("requests", verdict.requests)):
            if d is not None and not d.allowed:
                found.append((None, which, d))
                break  # the key's tokens first, as ever
    for ld in verdict.layers:
        if ld.layer.enforce != shadow:
            for which, d in (("requests", ld.requests), ("tokens", ld.tokens)):
                if d is not None and not d.allowed:
                    found.append((ld.layer, which, d))
    return max(found, key=lambda f: f[2].retry_after_s) if found else None


_WHOSE = {"tenant": "all the keys of tenant {} together", "model": "every request to {}"}


def _over_shared(
    verdict: Verdict,
    shared: SharedQuotas,
    layer: QuotaLayer,
    which: str,
    decision: RateDecision,
    cost: int,
) -> QuotaRefusal:
    """A tenant's or a model's quota refused (the key's own may have room)."""
    knob = f"{shared.knob(layer)}.{which}"
    units = cost if which == "tokens" else 1
    spec = layer.tokens if which == "tokens" else layer.requests
    period_s = spec.quota.period_s if spec is not None else verdict.period_s
    whose = _WHOSE[layer.name].format(repr(layer.scope))
    if math.isinf(decision.retry_after_s):
        refusal = Refusal(f"{which}_too_large", knob, decision.limit, units, retryable=False)
        message = (
            f"Request too large: it may use {cost} tokens but the {layer.name} quota {knob} "
            f"({whose}) is {decision.limit} per {period_s:g} s."
        )
        return QuotaRefusal(refusal, message, period_s, layer.name)
    observed = max(0, decision.limit - decision.remaining) + units
    refusal = Refusal(which, knob, decision.limit, observed)
    message = (
        f"Rate limit reached for your {layer.name}: {knob} ({whose}) is {decision.limit} per "
        f"{period_s:g} s and this request would make it {observed}. "
        "Retry after the time in Retry-After."
    )
    return QuotaRefusal(refusal, message, verdict.retry_after_s, layer.name)


def _over_quota(verdict: Verdict, record: KeyRecord, tier: TierSettings, cost: int) -> QuotaRefusal:
    which, decision = "requests", verdict.requests
    if verdict.tokens is not None and not verdict.tokens.allowed:
        which, decision = "tokens", verdict.tokens
    if decision is None or decision.allowed:
        # Redis is out and said last that this key's quota is used up: all of it, still
        which = verdict.spent or "requests"
        knob = quota_knob(record, tier.core.name, which)
        limit = getattr(record.quotas(tier.quotas), which)
        refusal = Refusal(which, knob, limit, limit)
        message = f"Rate limit reached ({knob}, used up); retry after Retry-After."
        return QuotaRefusal(refusal, message, verdict.retry_after_s)
    knob = quota_knob(record, tier.core.name, which)
    units = cost if which == "tokens" else 1
    if math.isinf(decision.retry_after_s):
        refusal = Refusal(f"{which}_too_large", knob, decision.limit, units, retryable=False)
        message = (
            f"Request too large: it may use {cost} tokens (prompt estimate plus max_tokens) but "
            f"the key's token quota ({knob}) is {decision.limit} per {verdict.period_s:g} s. "
            "Lower max_tokens or the prompt."
        )
        return QuotaRefusal(refusal, message, verdict.period_s)
    observed = max(0, decision.limit - decision.remaining) + units
    refusal = Refusal(which, knob, decision.limit, observed)
    scaled = ""
    if verdict.scaled_by != 1:  # health-driven: the quota shrunk while the backends are busy
        factor = f"tiers.{tier.core.name}.quota.congested_factor"
        scaled = f" ({factor} {verdict.scaled_by:g} of it while the backends are congested)"
    message = (
        f"Rate limit reached for your API key: {knob} is {decision.limit} per "
        f"{verdict.period_s:g} s{scaled} and this request would make it {observed}. "
        "Retry after the time in Retry-After."
    )
    return QuotaRefusal(refusal, message, verdict.retry_after_s)


def quota_error(
    verdict: Verdict,
    record: KeyRecord,
    tier: TierSettings,
    cost: int,
    shared: SharedQuotas = NO_SHARED,
) -> ApiError:
    """The 429 (over quota) or 503 (Redis out, slow or moving) for a refused `verdict`."""
    refusal, message, retry_after_s, _ = quota_refusal(verdict, record, tier, cost, shared)
    if verdict.source in (Source.CLOSED, Source.UNVERIFIED, Source.MOVING):
        return refused(503, message, refusal, retry_after_s=retry_after_s)
    kind = "tokens" if refusal.reason.startswith("tokens") else "requests"
    error = refused(429, message, refusal, retry_after_s=retry_after_s, type=kind)
    error.extra_headers.update(rate_limit_headers(verdict, own=record.quotas(tier.quotas).enforce))
    return error


def concurrency_error(record: KeyRecord, tier: str, cap: int, open_now: int) -> ApiError:
    """The 429 of a key that has `open_now` requests open here, at its cap (`controls`)."""
    knob = quota_knob(record, tier, "max_concurrency")
    refusal = Refusal("concurrency", knob, cap, open_now + 1)
    message = (
        f"Too many requests at once for your API key: {knob} is {cap} open at a time on this "
        "replica. Wait for one to end, or retry after Retry-After."
    )
    return refused(429, message, refusal, retry_after_s=1.0)


def keys_unavailable() -> ApiError:
    """A key neither known here nor checkable in Redis now: retry, not a 401."""
    refusal = Refusal("keys_unavailable", "redis.timeout_s")
    message = "Your API key could not be checked; retry shortly."
    return refused(503, message, refusal, retry_after_s=1.0)


# each shed reason: its message, its retry delay, and its knob, threshold and measured value
# from the tier, the core's snapshot and the shed itself
_Explain = Callable[[Shed, TierSettings, SchedulerStats, Controller], Refusal]


def _deadline(shed: Shed, tier: TierSettings, stats: SchedulerStats, _: Controller) -> Refusal:
    """The tier's longest wait, or the shorter one the request asked for (`controls`)."""
    asked_s = shed.request.deadline_at - shed.request.arrival_at
    if asked_s < tier.core.max_wait_s:
        return Refusal("deadline", f"request.{MAX_WAIT_HEADER}", asked_s, shed.queued_s)
    name = tier.core.name
    return Refusal("deadline", f"tiers.{name}.max_wait_s", tier.core.max_wait_s, shed.queued_s)


def _queue_full(shed: Shed, tier: TierSettings, stats: SchedulerStats, _: Controller) -> Refusal:
    name = tier.core.name
    depth = next((t.depth for t in stats.tiers if t.name == name), tier.core.max_depth)
    return Refusal("queue_full", f"tiers.{name}.max_depth", tier.core.max_depth, depth)


def _overload(
    shed: Shed, tier: TierSettings, stats: SchedulerStats, controller: Controller
) -> Refusal:
    """The congestion signal that set the tier's `shed_on_overload` off: backend pressure
    over its threshold, the latency signal over its target, or else the backends' drops."""
    seen = stats.controller
    if isinstance(controller, AIMDController):
        gains = controller.config
        if seen.pressure > gains.pressure_threshold:
            return Refusal(
                "overload", "controller.pressure_threshold", gains.pressure_threshold, seen.pressure
            )
        if seen.latency_s > gains.target_latency_s:
            return Refusal(
                "overload", "controller.target_latency_s", gains.target_latency_s, seen.latency_s
            )
    return Refusal("overload", f"tiers.{tier.core.name}.shed_on_overload")


def _predicted_wait(
    shed: Shed, tier: TierSettings, stats: SchedulerStats, _: Controller
) -> Refusal:
    name = tier.core.name
    return Refusal(
        "predicted_wait", f"tiers.{name}.max_wait_s", tier.core.max_wait_s, shed.predicted_wait_s
    )


def _draining(shed: Shed, tier: TierSettings, stats: SchedulerStats, _: Controller) -> Refusal:
    return Refusal("draining", "replica.draining")


SHED: dict[ShedReason, tuple[str, float, _Explain]] = {
    ShedReason.DEADLINE: (
        "The request waited its tier's longest wait in the queue; the service is busy.",
        2.0,
        _deadline,
    ),
    ShedReason.QUEUE_FULL: ("The service's queue for your tier is full.", 1.0, _queue_full),
    ShedReason.OVERLOAD: (
        "The service is overloaded; lower tiers are shed first.",
        1.0,
        _overload,
    ),
    ShedReason.DRAINING: ("This replica is draining: retry on another.", 5.0, _draining),
    ShedReason.PREDICTED_WAIT: (
        "The wait in your tier's queue would be longer than its longest wait; the service is busy.",
        2.0,
        _predicted_wait,
    ),
}


def shed_error(
    shed: Shed, tier: TierSettings, core_stats: SchedulerStats, controller: Controller
) -> ApiError:
    """The 503 for a shed request the tier's ladder could not answer."""
    message, retry_after_s, explain = SHED[shed.reason]
    refusal = explain(shed, tier, core_stats, controller)
    return refused(503, message, refusal, retry_after_s=retry_after_s)


def backend_saturated(model: str, status: int, retry_after: str | None) -> ApiError:
    """The backends answered 429 or 503: passed on as a 503, with their Retry-After if sane."""
    retry_after_s = 1.0
    if retry_after is not None and retry_after.strip().isdigit():
        retry_after_s = min(float(retry_after.strip()), 60.0) or 1.0
    refusal = Refusal("backend_saturated", f"models.{model}.backends", observed=status)
    return refused(503, "The model's backends are saturated.", refusal, retry_after_s=retry_after_s)


def backend_unavailable(model: str) -> ApiError:
    refusal = Refusal("backend_unavailable", f"models.{model}.backends")
    message = "No backend is available for this model right now."
    return refused(503, message, refusal, retry_after_s=2.0)
