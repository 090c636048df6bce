"""The quota store role, and its in-memory implementation: one key's request and token
quotas decided together, with burst credits, reservations and settlement.

Why a role with two stores: quotas must hold across replicas, so the service keeps them in
Redis (`backends.redis.quota.RedisQuotaStore`, one Lua script per call); the fail-open limiter
and the simulator keep them in this process (`MemoryQuotaStore`). Both make the very same
decisions on the same calls, in the pattern of the `limits` library: the `policies` algorithms
are the math, a store only keeps states; tests/backends/test_quota_store_matrix.py runs every
algorithm on both stores and compares every decision.

What a store does, step by step (the Lua script `backends.redis.lua._TAKE` does the same):

- `take`: decide the request quota (cost 1) and the token quota (cost = the reservation) on
  the current states; take both or neither. Refused, and `burst_credits` asked: admitted on
  `max(1, token_cost)` credits if the balance holds them, the quota states left untouched.
- `settle`: a reservation that used less gives the rest back (the algorithm's `refund`); one
  that used more takes the excess without refusing (`force`). Paid with credits, it settles
  against a balance that has not expired: the rest back to it, the excess out of it first.
- `give_back_request`: a call the backends failed gives its request unit back (or its credits).

The memory store's calls never suspend: `completed` runs one from synchronous code (the
simulator, the guard's settlement), so every caller goes through the same async methods.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, get_args

from policies.ratelimit import (
    GCRA,
    MemoryLimiter,
    Quota,
    RateAlgorithm,
    RateDecision,
    SlidingWindowCounter,
    SlidingWindowLog,
)

AlgorithmKind = Literal["gcra", "sliding_log", "sliding_counter"]
ALGORITHM_KINDS: tuple[AlgorithmKind, ...] = get_args(AlgorithmKind)
Slot = Literal["requests", "tokens"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class QuotaSpec:
    """A quota and the algorithm enforcing it, e.g. `QuotaSpec("gcra", Quota(60, 60.0))`."""

    algorithm: AlgorithmKind
    quota: Quota

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHM_KINDS:
            raise ValueError(
                f"quota.algorithm must be one of {', '.join(ALGORITHM_KINDS)}, "
                f"got {self.algorithm!r}"
            )
        if not isinstance(self.quota, Quota):
            raise ValueError(f"quota.quota must be a Quota, got {self.quota!r}")

    def rate_algorithm(self) -> RateAlgorithm[Any]:
        """The pure algorithm (the Lua twins repeat it line by line)."""
        if self.algorithm == "gcra":
            return GCRA(self.quota)
        if self.algorithm == "sliding_log":
            return SlidingWindowLog(self.quota)
        return SlidingWindowCounter(self.quota)


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """The outcome of one `take`.

    - `allowed`: admitted, by the base quotas or by burst credits.
    - `requests` / `tokens`: each base quota's decision (None when the key has no such quota).
    - `credits_spent`: credits spent on this request (0 unless the base quotas refused).
    - `credits_left`: the balance after this request, None when credits were not asked for.
    - `retry_after_s`: 0 when allowed, else the longest `retry_after_s` of the refusing quotas.
    - `decided_at`: the time the store decided at (Redis `TIME`, or the explicit `now`).
    """

    allowed: bool
    requests: RateDecision | None
    tokens: RateDecision | None
    credits_spent: int
    credits_left: int | None
    retry_after_s: float
    decided_at: float


class QuotaStore(Protocol):
    """Where a key's quota states and burst credits live.

    `now` is the store's decision time; None means the store's own clock (Redis `TIME`, one
    clock for every replica), which a memory store does not have: it needs `now`.
    """

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
    ) -> QuotaDecision:
        """Check and take 1 request and `token_cost` tokens for `key_id`, both or neither."""
        ...

    async def settle(
        self,
        key_id: str,
        *,
        tokens: QuotaSpec,
        reserved: int,
        actual: int,
        paid_with_credits: bool = False,
        now: float | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """Settle a reservation of `reserved` tokens that really used `actual`. With
        `on_error` the store may return without waiting for the settlement (then never
        suspending), telling a failure to `on_error` instead of raising it."""
        ...

    async def give_back_request(
        self,
        key_id: str,
        *,
        requests: QuotaSpec,
        credits: int = 0,
        now: float | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """Give back the request unit (or the `credits` it was admitted on); `on_error` as
        for `settle`."""
        ...

    async def add_credits(
        self, key_id: str, amount: int, *, ttl_s: float, now: float | None = None
    ) -> int:
        """Add `amount` credits, expiring `ttl_s` from now or later; return the balance."""
        ...

    async def credits(self, key_id: str, *, now: float | None = None) -> int:
        """`key_id`'s burst credit balance (0 when it has none or it expired)."""
        ...


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one admitted request holds of its key's quotas until it settles: the request
    unit and `reserved` tokens (or `credits_spent` credits, when the base quotas refused)."""

    key_id: str
    requests: QuotaSpec | None
    tokens: QuotaSpec | None
    reserved: int
    credits_spent: int = 0

    async def settle(
        self,
        store: QuotaStore,
        *,
        used: int,
        failed: bool,
        now: float | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """Settle by how the call ended: the tokens to what it `used` (0 when it `failed`)
        and, when the backends `failed` it, the request (or its credits) back too.
        `on_error`: the store need not wait (see `QuotaStore.settle`)."""
        credits = self.credits_spent
        if self.tokens is not None:
            await store.settle(
                self.key_id,
                tokens=self.tokens,
                reserved=self.reserved,
                actual=0 if failed else used,
                paid_with_credits=credits > 0,
                now=now,
                on_error=on_error,
            )
        if failed and self.requests is not None and (credits == 0 or self.tokens is None):
            # credits spent with a token quota went back with the tokens just now
            await store.give_back_request(
                self.key_id, requests=self.requests, credits=credits, now=now, on_error=on_error
            )


class MemoryQuotaStore:
    """Quota states and burst credits in this process, told the time on every call."""

    def __init__(self) -> None:
        self._limiters: dict[tuple[Slot, QuotaSpec], MemoryLimiter[Any]] = {}
        self._credits: dict[str, tuple[int, float]] = {}  # key -> (balance, expires at)

    def limiter(self, slot: Slot, spec: QuotaSpec) -> MemoryLimiter[Any]:
        """The per-key states of `slot` under `spec` (for tests and differential checks)."""
        limiter = self._limiters.get((slot, spec))
        if limiter is None:
            limiter = self._limiters[(slot, spec)] = MemoryLimiter(spec.rate_algorithm())
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
    ) -> QuotaDecision:
        at = _needs(now)
        asked: tuple[tuple[Slot, QuotaSpec | None, int], ...] = (
            ("requests", requests, 1),
            ("tokens", tokens, token_cost),
        )
        plans = [
            (limiter, *limiter.decide(key_id, now=at, cost=cost))
            for slot, spec, cost in asked
            if spec is not None
            for limiter in (self.limiter(slot, spec),)
        ]
        fits = all(decision.allowed for _, decision, _ in plans)
        balance = self._balance(key_id, at) if burst_credits else 0
        credit_cost = max(1, token_cost) if burst_credits else 0
        spent = 0
        if fits:
            for limiter, _, state in plans:
                limiter.put(key_id, state, now=at)
        elif credit_cost and balance >= credit_cost:
            spent = credit_cost
            balance -= spent
            self._credits[key_id] = (balance, self._credits[key_id][1])
        decisions = iter(decision for _, decision, _ in plans)
        request_d = next(decisions) if requests is not None else None
        token_d = next(decisions) if tokens is not None else None
        allowed = fits or spent > 0
        refusals = [d.retry_after_s for d in (request_d, token_d) if d and not d.allowed]
        return QuotaDecision(
            allowed=allowed,
            requests=request_d,
            tokens=token_d,
            credits_spent=spent,
            credits_left=balance if burst_credits else None,
            retry_after_s=0.0 if allowed or not refusals else max(refusals),
            decided_at=at,
        )

    async def settle(
        self,
        key_id: str,
        *,
        tokens: QuotaSpec,
        reserved: int,
        actual: int,
        paid_with_credits: bool = False,
        now: float | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        if reserved != actual:
            self._settle("tokens", key_id, tokens, reserved - actual, paid_with_credits, now)

    async def give_back_request(
        self,
        key_id: str,
        *,
        requests: QuotaSpec,
        credits: int = 0,
        now: float | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self._settle("requests", key_id, requests, credits or 1, credits > 0, now)

    async def add_credits(
        self, key_id: str, amount: int, *, ttl_s: float, now: float | None = None
    ) -> int:
        at = _needs(now)
        balance = self._balance(key_id, at) + amount
        expires = max(self._credits.get(key_id, (0, at))[1], at + ttl_s)
        self._credits[key_id] = (balance, expires)
        return balance

    async def credits(self, key_id: str, *, now: float | None = None) -> int:
        return self._balance(key_id, _needs(now))

    def _balance(self, key_id: str, now: float) -> int:
        held = self._credits.get(key_id)
        if held is None or held[1] <= now:
            self._credits.pop(key_id, None)
            return 0
        return held[0]

    def _settle(
        self, slot: Slot, key_id: str, spec: QuotaSpec, delta: int, paid: bool, now: float | None
    ) -> None:
        """`delta` > 0 gives back, < 0 takes without refusing; `paid` settles credits first."""
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
        limiter = self.limiter(slot, spec)
        if delta > 0:
            limiter.refund(key_id, now=at, cost=delta)
        else:
            limiter.force(key_id, now=at, cost=-delta)


def completed(call: Coroutine[Any, Any, T]) -> T:
    """The result of a call that never suspends (a `MemoryQuotaStore`'s), from sync code."""
    try:
        call.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    call.close()
    raise RuntimeError("the call suspended: only a store that never waits runs here")


def _needs(now: float | None) -> float:
    if now is None:
        raise ValueError("a memory quota store has no clock of its own: pass `now`")
    return now
