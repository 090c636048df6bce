"""The quota's answer headers: OpenAI's `x-ratelimit-*`, the IETF `RateLimit-Policy` /
`RateLimit` fields, the binding layer's name, and a shadow quota's `x-scheduler-quota-shadow`.

Why apart from the guard: the guard decides and holds; these only say what it decided, on a
200 and on the 429 alike (`scheduler.service.refusals`).
"""

from __future__ import annotations

import math

from policies.ratelimit import RateDecision
from scheduler.openai.errors import Refusal
from scheduler.service.quota import QuotaSettings, Source, Verdict


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `20ms`."""
    if not math.isfinite(seconds):
        return "0s"
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


FACTOR_HEADER = "x-ratelimit-congested-factor"


LAYER_HEADER = "x-ratelimit-layer-"  # + "requests" / "tokens": whose numbers are shown


def rate_limit_headers(verdict: Verdict, *, own: bool = True) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` fields and the IETF `RateLimit-Policy` / `RateLimit` fields,
    over the enforced layers (the key's own unless `own` is off: a shadow). With shared
    layers, `x-ratelimit-*-requests` (and `-tokens`) show the binding one, the refusing one
    (the longest wait) or else the one with the least left, and `x-ratelimit-layer-requests`
    names it; `RateLimit-Policy` lists every layer (`"requests"` the key's own,
    `"tenant-requests"`, `"model-tokens"`)."""
    headers: dict[str, str] = {}
    policies, states = [], []
    shown: list[tuple[str, str, RateDecision, float]] = []  # layer, unit, decision, period
    if own:
        shown += [("key", "requests", d, verdict.period_s) for d in (verdict.requests,) if d]
        shown += [("key", "tokens", d, verdict.period_s) for d in (verdict.tokens,) if d]
    for ld in verdict.layers:
        for unit, d, spec in (
            ("requests", ld.requests, ld.layer.requests),
            ("tokens", ld.tokens, ld.layer.tokens),
        ):
            if ld.layer.enforce and d is not None and spec is not None:
                shown.append((ld.layer.name, unit, d, spec.quota.period_s))
    for unit in ("requests", "tokens"):
        mine = [s for s in shown if s[1] == unit]
        if not mine:
            continue
        layer, _, decision, _ = min(mine, key=_binding)
        headers[f"x-ratelimit-limit-{unit}"] = str(decision.limit)
        headers[f"x-ratelimit-remaining-{unit}"] = str(max(0, decision.remaining))
        headers[f"x-ratelimit-reset-{unit}"] = _duration(decision.reset_after_s)
        if verdict.layers:
            headers[LAYER_HEADER + unit] = layer
    for layer, unit, decision, period_s in sorted(shown, key=lambda s: s[1] == "tokens"):
        name = unit if layer == "key" else f"{layer}-{unit}"
        window = max(1, round(period_s))
        policies.append(f'"{name}";q={decision.limit};w={window}')
        reset = math.ceil(decision.reset_after_s) if math.isfinite(decision.reset_after_s) else 0
        states.append(f'"{name}";r={max(0, decision.remaining)};t={reset}')
    if policies:
        headers["ratelimit-policy"] = ", ".join(policies)
        headers["ratelimit"] = ", ".join(states)
    if verdict.credits_left is not None:
        headers["x-ratelimit-burst-credits-remaining"] = str(verdict.credits_left)
    if verdict.credits_spent:
        headers["x-ratelimit-burst-credits-spent"] = str(verdict.credits_spent)
    if verdict.source is Source.LOCAL:
        headers["x-ratelimit-source"] = "local"
    if verdict.scaled_by != 1:  # the limits above are the congested ones
        headers[FACTOR_HEADER] = f"{verdict.scaled_by:g}"
    return headers


def _binding(shown: tuple[str, str, RateDecision, float]) -> tuple[int, float]:
    """The order of the layers' decisions on one unit: refusing first (the longest wait
    first), then the least left."""
    decision = shown[2]
    if not decision.allowed:
        return (0, -decision.retry_after_s)
    return (1, decision.remaining)


SHADOW_HEADER = "x-scheduler-quota-shadow"


def quota_headers(
    verdict: Verdict, quotas: QuotaSettings, would_refuse: Refusal | None = None
) -> dict[str, str]:
    """The headers of an admitted request's quota: the rate-limit fields of an enforced one;
    for a shadow quota only `x-scheduler-quota-shadow`, `allow` or `would-refuse` with the
    refusal's reason, knob, threshold and measured value (a client that throttles itself on
    the rate-limit fields must not react to a quota that is only being tried). With shared
    layers, each part is shown as its layer is enforced or shadow."""
    shadow_layers = any(not d.layer.enforce for d in verdict.layers)
    own_shadow = not quotas.enforce and not quotas.unlimited
    if not own_shadow and not shadow_layers:
        return rate_limit_headers(verdict)
    enforced = (quotas.enforce and not quotas.unlimited) or any(
        d.layer.enforce for d in verdict.layers
    )
    headers = rate_limit_headers(verdict, own=quotas.enforce) if enforced else {}
    if would_refuse is None:
        headers[SHADOW_HEADER] = "allow"
        return headers
    fields = would_refuse.fields()
    parts = [f"{k}={fields[k]}" for k in ("reason", "limit", "threshold", "observed")]
    shown = "; ".join(["would-refuse", *(p for p in parts if "=None" not in p)])
    headers[SHADOW_HEADER] = shown
    return headers
