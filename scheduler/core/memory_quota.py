"""The in-memory `QuotaStore` (`scheduler.core.quota_store`): the fail-open limiter's and the
simulator's, told the time on every call, deciding what the Redis script decides
(tests/backends/test_quota_store_matrix.py and test_quota_layers.py compare them call by call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from policies.ratelimit import MemoryLimiter, RateDecision
from scheduler.core.quota_store import (
    LayerDecision,
    LayerName,
    QuotaDecision,
    QuotaLayer,
    QuotaSpec,
    Slot,
    admission,
)

_Plan = tuple[MemoryLimiter[Any], str, RateDecision, Any]  # limiter, scope, decision, state


class MemoryQuotaStore:
    """Quota states and burst credits in this process, told the time on every call."""

    def __init__(self) -> None:
        self._limiters: dict[tuple[LayerName, Slot, QuotaSpec], MemoryLimiter[Any]] = {}
        self._credits: dict[str, tuple[int, float]] = {}  # key -> (balance, expires at)

    def limiter(self, slot: Slot, spec: QuotaSpec, layer: LayerName = "key") -> MemoryLimiter[Any]:
        """The states of `layer`'s `slot` quotas under `spec`, by key (or by the layer's
        scope: its tenant or model), for tests and differential checks."""
        limiter = self._limiters.get((layer, slot, spec))
        if limiter is None:
            limiter = MemoryLimiter(spec.rate_algorithm())
            self._limiters[(layer, slot, spec)] = limiter
        return limiter

    async def take(
        self,
        key_id: str,
        *,
        requests: QuotaSpec | None,
        tokens: QuotaSpec | None,
        token_cost: int,
        burst_credits: bool = True,
        now: float | None = None,
        timeout_s: float | None = None,
        enforce: bool = True,
        layers: Sequence[QuotaLayer] = (),
        tag: str | None = None,
    ) -> QuotaDecision:
        at = _needs(now)
        asked: list[tuple[LayerName, str, QuotaSpec | None, QuotaSpec | None]] = [
            ("key", key_id, requests, tokens),
            *((x.name, x.scope, x.requests, x.tokens) for x in layers),
        ]
        plans = [
            [
                self._decide(name, "requests", scope, r, 1, at),
                self._decide(name, "tokens", scope, t, token_cost, at),
            ]
            for name, scope, r, t in asked
        ]
        fits = [all(p[2].allowed for p in plan if p is not None) for plan in plans]
        enforced = [enforce, *(layer.enforce for layer in layers)]
        credits_asked = burst_credits and enforce  # a shadow's refusal spends nothing
        balance = self._balance(key_id, at) if credits_asked else 0
        credit_cost = max(1, token_cost) if credits_asked else 0
        allowed, spent, taken = admission(fits, enforced, credit_cost=credit_cost, balance=balance)
        for plan, take in zip(plans, taken, strict=True):
            for p in plan if take else ():
                if p is not None:
                    p[0].put(p[1], p[3], now=at)
        if spent:
            balance -= spent
            self._credits[key_id] = (balance, self._credits[key_id][1])
        decisions = [tuple(p and p[2] for p in plan) for plan in plans]
        refusals = [
            d.retry_after_s
            for pair, e in zip(decisions, enforced, strict=True)
            for d in pair
            if e and d is not None and not d.allowed
        ]
        return QuotaDecision(
            allowed=allowed,
            requests=decisions[0][0],
            tokens=decisions[0][1],
            credits_spent=spent,
            credits_left=balance if credits_asked else None,
            retry_after_s=0.0 if allowed or not refusals else max(refusals),
            decided_at=at,
            layers=tuple(
                LayerDecision(layer, *pair)
                for layer, pair in zip(layers, decisions[1:], strict=True)
            ),
        )

    def _decide(
        self, layer: LayerName, slot: Slot, scope: str, spec: QuotaSpec | None, cost: int, at: float
    ) -> _Plan | None:
        if spec is None:
            return None
        limiter = self.limiter(slot, spec, layer)
        return (limiter, scope, *limiter.decide(scope, now=at, cost=cost))

    async def settle(
        self,
        key_id: str,
        *,
        tokens: QuotaSpec | None,
        reserved: int,
        actual: int,
        paid_with_credits: bool = False,
        now: float | None = None,
        on_error: Callable[[Exception], None] | None = None,
        layers: Sequence[QuotaLayer] = (),
        tag: str | None = None,
    ) -> None:
        if reserved == actual:
            return
        delta = reserved - actual
        if tokens is not None:
            self._settle("key", "tokens", key_id, key_id, tokens, delta, paid_with_credits, now)
        for layer in layers:
            if layer.tokens is not None:
                self._settle(
                    layer.name, "tokens", key_id, layer.scope, layer.tokens, delta, False, now
                )

    async def give_back_request(
        self,
        key_id: str,
        *,
        requests: QuotaSpec | None,
        credits: int = 0,
        now: float | None = None,
        on_error: Callable[[Exception], None] | None = None,
        layers: Sequence[QuotaLayer] = (),
        tag: str | None = None,
    ) -> None:
        if requests is not None:
            self._settle(
                "key", "requests", key_id, key_id, requests, credits or 1, credits > 0, now
            )
        for layer in layers:
            if layer.requests is not None:
                self._settle(
                    layer.name, "requests", key_id, layer.scope, layer.requests, 1, False, now
                )

    async def add_credits(
        self,
        key_id: str,
        amount: int,
        *,
        ttl_s: float,
        now: float | None = None,
        tag: str | None = None,
    ) -> int:
        at = _needs(now)
        balance = self._balance(key_id, at) + amount
        expires = max(self._credits.get(key_id, (0, at))[1], at + ttl_s)
        self._credits[key_id] = (balance, expires)
        return balance

    async def credits(
        self, key_id: str, *, now: float | None = None, tag: str | None = None
    ) -> int:
        return self._balance(key_id, _needs(now))

    def _balance(self, key_id: str, now: float) -> int:
        held = self._credits.get(key_id)
        if held is None or held[1] <= now:
            self._credits.pop(key_id, None)
            return 0
        return held[0]

    def _settle(
        self,
        layer: LayerName,
        slot: Slot,
        key_id: str,
        scope: str,
        spec: QuotaSpec,
        delta: int,
        paid: bool,
        now: float | None,
    ) -> None:
        """`delta` > 0 gives back, < 0 takes without refusing; `paid` settles `key_id`'s
        credits first."""
        at = _needs(now)
        if paid:
            balance = self._balance(key_id, at)
            if delta > 0:
                if key_id in self._credits:
                    self._credits[key_id] = (balance + delta, self._credits[key_id][1])
                return
            taken = min(max(0, balance), -delta)
            if taken:
                self._credits[key_id] = (balance - taken, self._credits[key_id][1])
            delta += taken
            if delta == 0:
                return
        limiter = self.limiter(slot, spec, layer)
        if delta > 0:
            limiter.refund(scope, now=at, cost=delta)
        else:
            limiter.force(scope, now=at, cost=-delta)


def _needs(now: float | None) -> float:
    if now is None:
        raise ValueError("a memory quota store has no clock of its own: pass `now`")
    return now
