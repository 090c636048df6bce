"""Sliding-window log: exactly "at most `limit` units in any window of `period_s`".

Why this design: the log is the only algorithm here with no approximation and no burst beyond
`limit`, so it is the reference the others are measured against, and the right choice for small
limits (requests per minute). Its state is the list of recent takes, bounded because every
entry holds at least one unit and the live entries hold at most `limit` units; takes at the
same instant are merged into one entry. Entries are kept oldest first with strictly increasing
`at`, which maps onto a Redis sorted set (score `at`) or a list for the Lua twin.

An entry taken at `at` counts while `at + period_s > now + TIME_EPSILON_S`, i.e. a window is the
half-open interval (now - period_s, now]. A `now` earlier than the newest entry is treated as
that entry's time (time never runs backwards past what the log has recorded), and all durations
in the decision are measured from that effective time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from policies.quota import TIME_EPSILON_S, Quota, RateDecision, check_call


@dataclass(frozen=True, slots=True)
class LogEntry:
    """`cost` units (>= 1) taken at time `at`."""

    at: float
    cost: int


LogState = tuple[LogEntry, ...]
"""Entries oldest first, `at` strictly increasing; `None` or `()` for an idle key."""


class SlidingWindowLog:
    """Exact sliding-window limiter over a `LogState`. Ignores `quota.burst`."""

    __slots__ = ("_quota",)

    def __init__(self, quota: Quota) -> None:
        self._quota = quota

    def __repr__(self) -> str:
        return f"SlidingWindowLog({self._quota!r})"

    @property
    def quota(self) -> Quota:
        """The quota this algorithm enforces."""
        return self._quota

    def take(
        self, state: LogState | None, *, now: float, cost: int = 1
    ) -> tuple[RateDecision, LogState | None]:
        """Try to take `cost` units at `now`; return the decision and the next log.

        A cost above `limit` is refused with `retry_after_s = math.inf`; otherwise a refusal's
        `retry_after_s` is the time until enough of the oldest entries expire for `cost` to fit.
        A refused take and a take of cost 0 (a peek) return `state` unchanged.
        """
        check_call(now=now, cost=cost)
        now = _effective_now(state, now)
        live = self._live(state, now)
        used = sum(entry.cost for entry in live)
        limit = self._quota.limit
        if cost > limit:
            return self._decision(False, live, used, now, math.inf), state
        if used + cost > limit:
            free_at = self._free_at(live, used + cost - limit)
            return self._decision(False, live, used, now, free_at - now), state
        if cost == 0:
            return self._decision(True, live, used, now, 0.0), state
        if live and live[-1].at == now:
            log = (*live[:-1], LogEntry(now, live[-1].cost + cost))
        else:
            log = (*live, LogEntry(now, cost))
        return self._decision(True, log, used + cost, now, 0.0), log

    def refund(self, state: LogState | None, *, now: float, cost: int) -> LogState | None:
        """Give back `cost` units, removing or reducing the newest entries first."""
        check_call(now=now, cost=cost)
        if state is None:
            return None
        entries = list(self._live(state, _effective_now(state, now)))
        while cost > 0 and entries:
            newest = entries.pop()
            if newest.cost > cost:
                entries.append(LogEntry(newest.at, newest.cost - cost))
            cost -= newest.cost
        return tuple(entries)

    def force(self, state: LogState | None, *, now: float, cost: int) -> LogState | None:
        """Take `cost` units without refusing, into the newest entry when the log is full."""
        check_call(now=now, cost=cost)
        now = _effective_now(state, now)
        live = self._live(state, now)
        if live and (live[-1].at == now or len(live) >= self._quota.limit):
            return (*live[:-1], LogEntry(live[-1].at, live[-1].cost + cost))
        return (*live, LogEntry(now, cost))

    def ttl_s(self, state: LogState | None, *, now: float) -> float:
        """Time until the newest entry expires; after it the state is equivalent to `None`."""
        if not state:
            return 0.0
        now = _effective_now(state, now)
        return max(0.0, state[-1].at + self._quota.period_s - now)

    def _live(self, state: LogState | None, now: float) -> LogState:
        if not state:
            return ()
        period_s = self._quota.period_s
        for index, entry in enumerate(state):
            if entry.at + period_s > now + TIME_EPSILON_S:
                return state[index:]
        return ()

    def _free_at(self, live: LogState, needed: int) -> float:
        """When the oldest entries holding `needed` units will all have expired."""
        freed = 0
        for entry in live:
            freed += entry.cost
            if freed >= needed:
                return entry.at + self._quota.period_s
        raise AssertionError("needed more units than the log holds")  # pragma: no cover

    def _decision(
        self, allowed: bool, log: LogState, used: int, now: float, retry_s: float
    ) -> RateDecision:
        reset_s = log[-1].at + self._quota.period_s - now if log else 0.0
        return RateDecision(
            allowed=allowed,
            limit=self._quota.limit,
            remaining=max(0, self._quota.limit - used),
            retry_after_s=retry_s,
            reset_after_s=min(self._quota.period_s, max(0.0, reset_s)),  # float rounding
        )


def _effective_now(state: LogState | None, now: float) -> float:
    return max(now, state[-1].at) if state else now
