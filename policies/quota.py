"""The vocabulary every rate-limit algorithm shares: `Quota`, `RateDecision`, `RateAlgorithm`.

Why this design: as in the `limits` library, the math is kept apart from the storage. An
algorithm is a stateless object built from a `Quota`; it reads an explicit, immutable state value
(`None` meaning "no state yet", i.e. an absent Redis key) and returns a decision plus the next
state. The in-memory store (`policies.memory`) and the Redis Lua twins keep the very same state,
so a differential test can replay one sequence of calls on both and compare decisions.

Times are monotonic float seconds. Float rounding would otherwise make a limiter refuse at the
very instant it promised (`now + retry_after_s` rounds, and a GCRA's TAT drifts by up to half an
ulp per take: about 1.2e-7 s per take at epoch-scale clock values such as Redis `TIME`), so
every "has time `x` been reached at `now`?" test is written `x <= now + TIME_EPSILON_S`.
A tenth of a millisecond covers hundreds of drifting takes at epoch scale and is far below
anything a client could notice; the price is that a limiter may admit up to `TIME_EPSILON_S`
early, i.e. `TIME_EPSILON_S / T` extra units, which only shows at rates above 10,000 units/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, TypeVar

TIME_EPSILON_S = 1e-4
"""Two times closer than this are treated as equal (see the module docstring)."""

S = TypeVar("S")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, init=False)
class Quota:
    """At most `limit` units per `period_s` seconds, with up to `burst` units at once.

    `burst` is the capacity of the GCRA bucket: how many units may go back to back from an idle
    start. It defaults to `limit`, the usual token bucket (capacity `limit`, refilled at
    `limit / period_s`), so an idle key may spend its whole period's quota at once and a GCRA
    admits at most `burst + limit` units in any window of `period_s`. The window algorithms
    ignore `burst`: their capacity is `limit`.

    Invalid values raise `ValueError` naming the field, e.g. "quota.period_s must be > 0, got 0".
    """

    limit: int
    period_s: float
    burst: int

    def __init__(self, limit: int, period_s: float, burst: int | None = None) -> None:
        if not _is_int(limit) or limit < 1:
            raise ValueError(f"quota.limit must be an integer >= 1, got {limit!r}")
        if (
            isinstance(period_s, bool)
            or not isinstance(period_s, int | float)
            or not math.isfinite(period_s)
            or period_s <= 0
        ):
            raise ValueError(f"quota.period_s must be > 0, got {period_s!r}")
        if burst is None:
            burst = limit
        if not _is_int(burst) or burst < 1:
            raise ValueError(f"quota.burst must be an integer >= 1, got {burst!r}")
        object.__setattr__(self, "limit", limit)
        object.__setattr__(self, "period_s", float(period_s))
        object.__setattr__(self, "burst", burst)

    def per_replica(self, replicas: int) -> Quota:
        """This quota's share on one of `replicas` processes (fail-open mode), rounded up.

        Rounding up keeps every share >= 1, so the whole fleet may admit slightly more than the
        global quota while Redis is down; that is the point of failing open.
        """
        if not _is_int(replicas) or replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
        return Quota(
            limit=-(-self.limit // replicas),
            period_s=self.period_s,
            burst=-(-self.burst // replicas),
        )


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The outcome of one `take`.

    - `allowed`: whether the units were taken.
    - `limit`: the quota's `limit` (what `x-ratelimit-limit-*` advertises).
    - `remaining`: units that could still be taken at this instant, rounded down (for a GCRA
      with `burst > limit` it may exceed `limit`).
    - `retry_after_s`: 0 when allowed; when refused, the wait after which the same cost is
      allowed if nothing else happens, or `math.inf` when the cost can never fit.
    - `reset_after_s`: time until the limiter is back to its idle, empty state.
    """

    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float
    reset_after_s: float


class RateAlgorithm(Protocol[S]):
    """A rate-limit algorithm: pure math over an explicit state of type `S`.

    `None` is the state of a key never seen (or evicted). Implementations never mutate a state;
    they return a new one. A refused take returns the state it was given, and so does a take of
    cost 0 (a peek). A `now` earlier than what the state has already seen never un-expires
    anything: each algorithm documents how it treats it.
    """

    @property
    def quota(self) -> Quota:
        """The quota this algorithm enforces."""
        ...

    def take(self, state: S | None, *, now: float, cost: int = 1) -> tuple[RateDecision, S | None]:
        """Try to take `cost` units at `now`; return the decision and the next state."""
        ...

    def refund(self, state: S | None, *, now: float, cost: int) -> S | None:
        """Give back `cost` units taken earlier (e.g. a token reservation settled lower)."""
        ...

    def force(self, state: S | None, *, now: float, cost: int) -> S | None:
        """Take `cost` units without refusing (a settled reservation that ran over)."""
        ...

    def ttl_s(self, state: S | None, *, now: float) -> float:
        """How long `state` must be kept; after that it is equivalent to `None`."""
        ...


def check_call(*, now: float, cost: int) -> None:
    """Raise `ValueError` unless `now` is a finite time and `cost` an integer >= 0."""
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite time, got {now!r}")
    if not _is_int(cost) or cost < 0:
        raise ValueError(f"cost must be an integer >= 0, got {cost!r}")
