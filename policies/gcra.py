"""GCRA: the generic cell rate algorithm (a token bucket kept as one number).

Why this design: GCRA stores a single float per key, the theoretical arrival time (TAT), and
decides in O(1) with no refill loop, which makes it the cheapest algorithm to keep in Redis and
the easiest to mirror exactly in Lua. It follows redis-cell's CL.THROTTLE, except that `burst`
is the bucket's capacity (redis-cell's `max_burst + 1`).

With T = period_s / limit (the emission interval) and tolerance tau = T * burst, a take of
`cost` units at `now` is, in this exact order of float operations (the Lua twin repeats it):

    tat      = now if state is None else max(state, now)
    new_tat  = tat + T * cost
    allow_at = new_tat - tau
    allowed  = cost <= burst and allow_at <= now + TIME_EPSILON_S

An allowed take stores `new_tat`; a refused one stores nothing. Since the state holds no past
timestamp that could "un-expire", a `now` earlier than a previous call needs no clamping: it is
used as given, and GCRA's answer only gets stricter as `now` goes back.
"""

from __future__ import annotations

import math

from policies.quota import TIME_EPSILON_S, Quota, RateDecision, check_call


class GCRA:
    """GCRA over a state that is the TAT (`float`), or `None` for an idle key.

    Admits at most `burst + (t2 - t1 + TIME_EPSILON_S) / T` units at times in any interval
    [t1, t2], so `burst + limit - 1` in a window of `period_s` (see `policies.ratelimit`);
    with the default `burst = limit`, `2 * limit - 1`. A decision's `reset_after_s` is the
    time until the bucket is full again: at most `T * burst` (`period_s` by default).
    """

    __slots__ = ("_interval_s", "_quota", "_tolerance_s")

    def __init__(self, quota: Quota) -> None:
        self._quota = quota
        self._interval_s = quota.period_s / quota.limit
        self._tolerance_s = self._interval_s * quota.burst

    def __repr__(self) -> str:
        return f"GCRA({self._quota!r})"

    @property
    def quota(self) -> Quota:
        """The quota this algorithm enforces."""
        return self._quota

    @property
    def emission_interval_s(self) -> float:
        """T = period_s / limit: the time one unit takes to drain."""
        return self._interval_s

    @property
    def tolerance_s(self) -> float:
        """tau = T * burst: how far ahead of `now` the TAT may run."""
        return self._tolerance_s

    def take(
        self, state: float | None, *, now: float, cost: int = 1
    ) -> tuple[RateDecision, float | None]:
        """Try to take `cost` units at `now`; return the decision and the next TAT.

        A cost above `burst` is refused with `retry_after_s = math.inf`. A refused take and a
        take of cost 0 (a peek) return `state` unchanged.
        """
        check_call(now=now, cost=cost)
        tat = now if state is None else max(state, now)
        if cost > self._quota.burst:
            return self._decision(False, tat, now, math.inf), state
        new_tat = tat + self._interval_s * cost
        allow_at = new_tat - self._tolerance_s
        if allow_at > now + TIME_EPSILON_S:
            return self._decision(False, tat, now, allow_at - now), state
        if cost == 0:
            return self._decision(True, tat, now, 0.0), state
        return self._decision(True, new_tat, now, 0.0), new_tat

    def refund(self, state: float | None, *, now: float, cost: int) -> float | None:
        """Give back `cost` units: move the TAT back by `T * cost`, never below `now`."""
        check_call(now=now, cost=cost)
        if state is None or cost == 0:
            return state
        return max(now, state - self._interval_s * cost)

    def force(self, state: float | None, *, now: float, cost: int) -> float | None:
        """Take `cost` units without refusing (a reservation settled higher than estimated)."""
        check_call(now=now, cost=cost)
        tat = now if state is None else max(state, now)
        return tat + self._interval_s * cost

    def ttl_s(self, state: float | None, *, now: float) -> float:
        """Time until the TAT is reached; after it the state is equivalent to `None`."""
        if state is None:
            return 0.0
        return max(0.0, state - now)

    def _decision(self, allowed: bool, tat: float, now: float, retry_s: float) -> RateDecision:
        # remaining = floor((now + EPS + tau - tat) / T): the unit takes that would still pass.
        room_s = now + TIME_EPSILON_S + self._tolerance_s - tat
        remaining = max(0, min(self._quota.burst, math.floor(room_s / self._interval_s)))
        return RateDecision(
            allowed=allowed,
            limit=self._quota.limit,
            remaining=remaining,
            retry_after_s=retry_s,
            # the TAT may run up to TIME_EPSILON_S past tau: never report more than tau
            reset_after_s=min(self._tolerance_s, max(0.0, tat - now)),
        )
