"""Sliding-window counter: an O(1)-memory approximation of the sliding-window log.

Why this design: the log costs up to `limit` entries per key, too much for token quotas
(millions of units). The counter keeps two integers, the units taken in the current fixed window
and in the one before, and estimates the sliding window by weighting the previous window by the
part of it still inside the sliding one (Cloudflare's and `limits`' "moving window"):

    estimate = previous * (1 - elapsed / period_s) + current

Windows are aligned on the clock: window k is [k * period_s, (k + 1) * period_s) and the state
stores the index k, an integer, so Python and the Lua twin agree on window boundaries without
comparing floats. From an idle start it admits exactly `limit` units at one instant; over any
sliding window of `period_s` it admits at most `2 * limit - 1` (each fixed window holds at most
`limit`, and the previous window's units still weigh on the next until its very end), which is
its documented looseness (see `policies.ratelimit` for the exact statement).

The decision's `reset_after_s` is the end of the current fixed window, never more than
`period_s` away: then the previous window's units are gone and the current window's begin to
age out. (Back to the idle state takes until the end of the next window, up to `2 * period_s`:
that is `ttl_s`, how long the state must be kept, not what a client is told to wait.)

To avoid dividing by a weight, the rule "estimate + cost <= limit" is evaluated as a time: with
free = limit - current - cost, the take is allowed from `threshold_at = k * period_s +
period_s * (1 - free / previous)` on (immediately if free >= previous, never in this window if
free < 0). As everywhere, a time is reached when `time <= now + TIME_EPSILON_S`; the window index
is `floor((now + TIME_EPSILON_S) / period_s)` for the same reason. A `now` earlier than the
stored window's start is treated as that start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from policies.quota import TIME_EPSILON_S, Quota, RateDecision, check_call


@dataclass(frozen=True, slots=True)
class CounterState:
    """Units taken in fixed window `window` (index = floor(now / period_s)) and the one before."""

    window: int
    current: int
    previous: int


class SlidingWindowCounter:
    """Approximate sliding-window limiter over a `CounterState`. Ignores `quota.burst`."""

    __slots__ = ("_quota",)

    def __init__(self, quota: Quota) -> None:
        self._quota = quota

    def __repr__(self) -> str:
        return f"SlidingWindowCounter({self._quota!r})"

    @property
    def quota(self) -> Quota:
        """The quota this algorithm enforces."""
        return self._quota

    def take(
        self, state: CounterState | None, *, now: float, cost: int = 1
    ) -> tuple[RateDecision, CounterState | None]:
        """Try to take `cost` units at `now`; return the decision and the next counters.

        A cost above `limit` is refused with `retry_after_s = math.inf`. A refused take and a
        take of cost 0 (a peek) return `state` unchanged.
        """
        check_call(now=now, cost=cost)
        now, rolled = self._roll(state, now)
        limit = self._quota.limit
        if cost > limit:
            return self._decision(False, rolled, now, math.inf), state
        free = limit - rolled.current - cost
        if free < 0:  # not in this window: in the next one, `current` becomes `previous`.
            threshold_at = self._threshold_at(rolled.window + 1, rolled.current, limit - cost)
        else:
            threshold_at = self._threshold_at(rolled.window, rolled.previous, free)
        if threshold_at > now + TIME_EPSILON_S:
            return self._decision(False, rolled, now, threshold_at - now), state
        if cost == 0:
            return self._decision(True, rolled, now, 0.0), state
        taken = CounterState(rolled.window, rolled.current + cost, rolled.previous)
        return self._decision(True, taken, now, 0.0), taken

    def refund(self, state: CounterState | None, *, now: float, cost: int) -> CounterState | None:
        """Give back `cost` units: from the current window first, then the previous one."""
        check_call(now=now, cost=cost)
        if state is None:
            return None
        _, rolled = self._roll(state, now)
        from_current = min(cost, rolled.current)
        from_previous = min(cost - from_current, rolled.previous)
        return CounterState(
            rolled.window, rolled.current - from_current, rolled.previous - from_previous
        )

    def force(self, state: CounterState | None, *, now: float, cost: int) -> CounterState | None:
        """Take `cost` units without refusing, into the current window."""
        check_call(now=now, cost=cost)
        _, rolled = self._roll(state, now)
        return CounterState(rolled.window, rolled.current + cost, rolled.previous)

    def ttl_s(self, state: CounterState | None, *, now: float) -> float:
        """Time until both counters have aged out; after it the state is equivalent to `None`."""
        if state is None:
            return 0.0
        now, rolled = self._roll(state, now)
        period_s = self._quota.period_s
        if rolled.current > 0:
            return max(0.0, (rolled.window + 2) * period_s - now)
        if rolled.previous > 0:
            return max(0.0, (rolled.window + 1) * period_s - now)
        return 0.0

    def _roll(self, state: CounterState | None, now: float) -> tuple[float, CounterState]:
        """The effective `now` and the state moved to the window containing it."""
        period_s = self._quota.period_s
        if state is not None:
            now = max(now, state.window * period_s)
        window = math.floor((now + TIME_EPSILON_S) / period_s)
        if state is None:
            return now, CounterState(window, 0, 0)
        if window <= state.window:
            return now, state
        if window == state.window + 1:
            return now, CounterState(window, 0, state.current)
        return now, CounterState(window, 0, 0)

    def _threshold_at(self, window: int, previous: int, free: int) -> float:
        """From when `previous * weight <= free` holds in `window` (weight falling 1 to 0)."""
        period_s = self._quota.period_s
        if free >= previous:
            return window * period_s
        return window * period_s + period_s * (1 - free / previous)

    def _reset_after_s(self, state: CounterState, now: float) -> float:
        """Until the current fixed window ends (see the module docstring): <= period_s."""
        if state.current == 0 and state.previous == 0:
            return 0.0
        # a `now` within TIME_EPSILON_S of a window's end already counts in the next window
        period_s = self._quota.period_s
        return min(period_s, max(0.0, (state.window + 1) * period_s - now))

    def _decision(
        self, allowed: bool, state: CounterState, now: float, retry_s: float
    ) -> RateDecision:
        period_s = self._quota.period_s
        # the weight at the instant `take` judges by (it allows a threshold TIME_EPSILON_S
        # ahead), so `remaining` is exactly the unit takes that would succeed now
        elapsed_s = now + TIME_EPSILON_S - state.window * period_s
        weight = min(1.0, max(0.0, 1 - elapsed_s / period_s))
        estimate = state.previous * weight + state.current
        # Rounded down, with a hair of slack so an exact fit is not lost to float rounding.
        remaining = math.floor(self._quota.limit - estimate + 1e-9)
        return RateDecision(
            allowed=allowed,
            limit=self._quota.limit,
            remaining=max(0, min(self._quota.limit - state.current, remaining)),
            retry_after_s=retry_s,
            reset_after_s=self._reset_after_s(state, now),
        )
