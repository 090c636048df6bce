"""The quota store role: one key's request and token quotas decided together with the
layers it shares (its tenant's, its model's), with burst credits, reservations and settlement.

Why a role with two stores: quotas must hold across replicas, so the service keeps them in
Redis (`backends.redis.quota.RedisQuotaStore`, one Lua script per call); the fail-open limiter
and the simulator keep them in this process (`scheduler.core.memory_quota.MemoryQuotaStore`).
Both make the very same decisions on the same calls, in the pattern of the `limits` library:
the `policies` algorithms are the math, a store only keeps states;
tests/backends/test_quota_store_matrix.py runs every algorithm on both stores and compares
every decision.

What a store does, step by step (the Lua script `backends.redis.lua._TAKE` does the same):

- `take`: decide the request quota (cost 1) and the token quota (cost = the reservation) of
  every layer (the key's own, then each `QuotaLayer`: its tenant's, its model's) on the
  current states. No enforced layer refuses: every layer that fits is taken (a shadow layer,
  `enforce=False`, that would refuse takes nothing and blocks nothing). Only the key's own
  enforced layer refuses and `burst_credits` is asked: admitted on `max(1, token_cost)`
  credits if the balance holds them, the key's states left untouched and the other layers
  taken. Any other enforced refusal: nothing is taken on any layer.
- `settle`: a reservation that used less gives the rest back (the algorithm's `refund`); one
  that used more takes the excess without refusing (`force`), on every layer it was taken
  on. Paid with credits, the key's own settles against a balance that has not expired: the
  rest back to it, the excess out of it first.
- `give_back_request`: a call the backends failed gives its request unit back (or its
  credits) on every layer.

Credits are the key's own: they never pay for a tenant's or a model's quota (a model's is a
contract with a backend, which no balance of ours extends).

The memory store's calls never suspend: `completed` runs one from synchronous code (the
simulator, the guard's settlement), so every caller goes through the same async methods.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, get_args

from policies.ratelimit import (
    GCRA,
    Quota,
    RateAlgorithm,
    RateDecision,
    SlidingWindowCounter,
    SlidingWindowLog,
)

AlgorithmKind = Literal["gcra", "sliding_log", "sliding_counter"]
ALGORITHM_KINDS: tuple[AlgorithmKind, ...] = get_args(AlgorithmKind)
Slot = Literal["requests", "tokens"]
LayerName = Literal["key", "tenant", "model"]
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
class QuotaLayer:
    """Quotas one key shares with others: its tenant's (`name="tenant"`, all the tenant's
    keys together) or its model's (`name="model"`, every key's requests to that model, e.g.
    a backend's tokens per minute), counted under `scope` (the tenant's or the model's
    name). With `enforce` off, a shadow layer: counted while it fits, never refusing."""

    name: LayerName
    scope: str
    requests: QuotaSpec | None = None
    tokens: QuotaSpec | None = None
    enforce: bool = True

    def __post_init__(self) -> None:
        if self.name == "key" or self.name not in get_args(LayerName):
            raise ValueError(f"a quota layer is 'tenant' or 'model', got {self.name!r}")
        if not self.scope:
            raise ValueError("a quota layer needs a scope (its tenant or model)")


@dataclass(frozen=True, slots=True)
class LayerDecision:
    """One layer's decisions in a `take` (None where the layer has no such quota)."""

    layer: QuotaLayer
    requests: RateDecision | None
    tokens: RateDecision | None

    @property
    def fits(self) -> bool:
        return all(d.allowed for d in (self.requests, self.tokens) if d is not None)


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """The outcome of one `take`.

    - `allowed`: admitted, by the base quotas or by burst credits.
    - `requests` / `tokens`: the key's own quotas' decisions (None when it has no such quota).
    - `layers`: the shared layers' decisions, in the order asked.
    - `credits_spent`: credits spent on this request (0 unless the base quotas refused).
    - `credits_left`: the balance after this request, None when credits were not asked for.
    - `retry_after_s`: 0 when allowed, else the longest `retry_after_s` of the refusing
      enforced quotas.
    - `decided_at`: the time the store decided at (Redis `TIME`, or the explicit `now`).
    """

    allowed: bool
    requests: RateDecision | None
    tokens: RateDecision | None
    credits_spent: int
    credits_left: int | None
    retry_after_s: float
    decided_at: float
    layers: tuple[LayerDecision, ...] = ()

    def taken(self) -> tuple[QuotaLayer, ...]:
        """The shared layers this admission was counted on (none when refused)."""
        if not self.allowed:
            return ()
        return tuple(d.layer for d in self.layers if d.fits)


def admission(
    fits: list[bool], enforced: list[bool], *, credit_cost: int, balance: int
) -> tuple[bool, int, list[bool]]:
    """The rule of `take` over its layers' decisions (the key's own first), written once for
    the memory store (the Lua script repeats it): admitted or not, the credits spent, and
    which layers are taken."""
    blocking = [i for i, (f, e) in enumerate(zip(fits, enforced, strict=True)) if e and not f]
    if not blocking:
        return True, 0, fits
    if blocking == [0] and credit_cost and balance >= credit_cost:
        return True, credit_cost, [False, *fits[1:]]
    return False, 0, [False] * len(fits)


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
        enforce: bool = True,
        layers: Sequence[QuotaLayer] = (),
        tag: str | None = None,
    ) -> QuotaDecision:
        """Check and take 1 request and `token_cost` tokens for `key_id` and on every one of
        `layers`, all or none (see the module docstring for shadow layers and credits).
        `enforce` off: the key's own quotas are a shadow layer. `tag`: where the store keeps
        the states of the call (Redis: one Cluster slot); the same for every call of a key."""
        ...

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
        """Settle a reservation of `reserved` tokens that really used `actual`, on the key's
        token quota (None: not taken there) and on each of `layers`' token quotas. With
        `on_error` the store may return without waiting for the settlement (then never
        suspending), telling a failure to `on_error` instead of raising it."""
        ...

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
        """Give back the request unit (or the `credits` it was admitted on) to the key's
        request quota (None: not taken there) and to each of `layers`' request quotas;
        `on_error` as for `settle`."""
        ...

    async def add_credits(
        self,
        key_id: str,
        amount: int,
        *,
        ttl_s: float,
        now: float | None = None,
        tag: str | None = None,
    ) -> int:
        """Add `amount` credits, expiring `ttl_s` from now or later; return the balance."""
        ...

    async def credits(
        self, key_id: str, *, now: float | None = None, tag: str | None = None
    ) -> int:
        """`key_id`'s burst credit balance (0 when it has none or it expired)."""
        ...


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one admitted request holds of its key's quotas until it settles: the request
    unit and `reserved` tokens (or `credits_spent` credits, when the base quotas refused),
    on the key's own quotas (None where not taken) and on each of `layers`."""

    key_id: str
    requests: QuotaSpec | None
    tokens: QuotaSpec | None
    reserved: int
    credits_spent: int = 0
    layers: tuple[QuotaLayer, ...] = ()
    tag: str | None = None

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
        token_layers = tuple(layer for layer in self.layers if layer.tokens is not None)
        if self.tokens is not None or token_layers:
            await store.settle(
                self.key_id,
                tokens=self.tokens,
                reserved=self.reserved,
                actual=0 if failed else used,
                paid_with_credits=credits > 0,
                now=now,
                on_error=on_error,
                layers=token_layers,
                tag=self.tag,
            )
        if not failed:
            return
        # credits spent with a token quota went back with the tokens just now
        requests = self.requests if credits == 0 or self.tokens is None else None
        request_layers = tuple(layer for layer in self.layers if layer.requests is not None)
        if requests is not None or request_layers:
            await store.give_back_request(
                self.key_id,
                requests=requests,
                credits=credits if requests is not None else 0,
                now=now,
                on_error=on_error,
                layers=request_layers,
                tag=self.tag,
            )


def completed(call: Coroutine[Any, Any, T]) -> T:
    """The result of a call that never suspends (a `MemoryQuotaStore`'s), from sync code."""
    try:
        call.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    call.close()
    raise RuntimeError("the call suspended: only a store that never waits runs here")
