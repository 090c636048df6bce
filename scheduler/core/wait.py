"""The queue wait predicted for an arrival, so that a request that would wait past its
deadline is shed at once (fail fast) instead of after the wait.

Why this estimate: the work ahead of the request leaves its tier at the tier's rate.

- Work ahead: keys share a tier equally, so before the request every other key is served
  as much as the request's key has queued plus the request, or all it has queued; the sum
  is bounded by the tier's queued cost (so a light key is not shed for a noisy neighbour's
  flood). Arrivals of other keys after it are not foreseen: a heavy key's request can still
  wait past the prediction, and meets the deadline, the backstop.
- The tier's rate: the gate's drain rate times the tier's share. While there is a queue
  the gate is full, so it drains at its limit in rate mode, or its window over the mean time
  a call holds a slot in window mode (Little's law), times the mean cost of a call; both
  means follow the calls that ended, and lag by a few dozen calls when the backends speed up
  again, so the cost per second the calls ended with, measured while there was a queue,
  counts instead when it is more. Counting admissions instead fails twice: after a cut of
  the limit nothing is admitted until in-flight is down to it (a rate of 0 for a moment, and
  every arrival predicted to wait forever), and after an idle spell they show the demand,
  not the capacity. The share is the tier's weight among the queued tiers of its priority
  band (the fair queue's guarantee), times the part of the window its band can count on
  under strict priority (`scheduler.core.bands.Bands.slots`: its floor while a higher band
  is queued), or what it was measured to get while it was backlogged, when the others leave
  it more.

Nothing is predicted before a call has ended.
"""

from __future__ import annotations

import math

from scheduler.core.wfq import Backlog

_CALLS = 64  # the means of latency and cost follow about this many recent calls
_TIME_CONSTANT_S = 1.0  # of the per-tick averages: a few ticks, quick at a spike's onset
_FRESH_S = 5.0  # a share or rate measured longer ago than this no longer counts


class WaitPredictor:
    """The gate's drain rate and each tier's share of it."""

    __slots__ = (
        "_admitted",
        "_at",
        "_backlogged",
        "_cost",
        "_ended",
        "_ended_at_tick",
        "_ended_rate",
        "_ended_rate_at",
        "_latency_s",
        "_measured_at",
        "_shares",
    )

    def __init__(self, tiers: list[str], *, now: float) -> None:
        self._at = now
        self._latency_s = math.nan  # mean time a call holds its slot
        self._cost = math.nan  # mean cost of a call
        self._ended = self._ended_at_tick = 0.0  # cost of the calls that ended: running totals
        self._ended_rate = math.nan  # of it per second, while there was a queue
        self._ended_rate_at = -math.inf
        self._shares = dict.fromkeys(tiers, math.nan)  # of the admitted cost, while backlogged
        self._measured_at = dict.fromkeys(tiers, -math.inf)
        self._admitted = dict.fromkeys(tiers, 0.0)  # running totals at the last tick
        self._backlogged = dict.fromkeys(tiers, False)  # at the last tick

    def observe_call(self, latency_s: float, cost: float) -> None:
        """A call of `cost` ended after holding its slot `latency_s`."""
        self._ended += cost
        if math.isnan(self._latency_s):
            self._latency_s, self._cost = latency_s, cost
            return
        self._latency_s += (latency_s - self._latency_s) / _CALLS
        self._cost += (cost - self._cost) / _CALLS

    def observe_tick(
        self, *, now: float, admitted: dict[str, float], depths: dict[str, int]
    ) -> None:
        """One tick: each tier's admitted cost since the start (a running total) and queue
        depth now. A tier's share is measured over the ticks it was backlogged at both ends."""
        elapsed = now - self._at
        if elapsed <= 0:
            return
        keep = math.exp(-elapsed / _TIME_CONSTANT_S)
        deltas = {name: cost - self._admitted[name] for name, cost in admitted.items()}
        total = sum(deltas.values())
        if any(self._backlogged.values()) and any(depths.values()):
            sample = (self._ended - self._ended_at_tick) / elapsed
            fresh = now - self._ended_rate_at <= _FRESH_S + elapsed
            old = self._ended_rate
            self._ended_rate = old * keep + sample * (1 - keep) if fresh else sample
            self._ended_rate_at = now
        self._ended_at_tick = self._ended
        shares, measured_at = self._shares, self._measured_at
        for name, delta in deltas.items():
            queued = depths[name] > 0
            if queued and self._backlogged[name] and total > 0:
                sample = delta / total
                fresh = now - measured_at[name] <= _FRESH_S + elapsed
                shares[name] = shares[name] * keep + sample * (1 - keep) if fresh else sample
                measured_at[name] = now
            self._admitted[name] = admitted[name]
            self._backlogged[name] = queued
        self._at = now

    def drain_rate(self, *, slots_per_s: float | None, window: int, now: float) -> float:
        """The cost per second a full gate lets through: `slots_per_s` in rate mode (None in
        window mode, where it is `window` over the mean latency), or what ended per second
        of late if more; nan before any call ended."""
        per_s = slots_per_s if slots_per_s is not None else window / self._latency_s
        rate = per_s * self._cost
        if now - self._ended_rate_at <= _FRESH_S and self._ended_rate > rate:
            return self._ended_rate
        return rate

    def slots_rate(self, slots: float) -> float:
        """The cost per second `slots` held at once let through (Little's law, as a full
        window drains): 0 for no slots, nan before any call ended."""
        return slots / self._latency_s * self._cost if slots > 0 else 0.0

    def predict_wait_s(
        self,
        tier: str,
        backlog: Backlog,
        cost: float,
        *,
        share: float,
        drain_rate: float,
        now: float,
        measured: bool = True,
    ) -> float:
        """Seconds until a request of `cost` behind `backlog` is admitted, `share` being its
        tier's weight over the weight of the tiers queued with it (or what the tier was
        measured to get, if more and `measured`), at `drain_rate`: 0 with nothing queued or
        nothing known yet; infinite when the tier may get nothing (`drain_rate` 0)."""
        if not backlog.tier_cost or math.isnan(drain_rate):
            return 0.0
        if not drain_rate > 0:  # a band held back to nothing
            return math.inf
        if measured:
            measured_share = self._shares[tier]
            if now - self._measured_at[tier] <= _FRESH_S and measured_share > share:
                share = measured_share
        tier_cost, own, keys = backlog
        ahead = min(tier_cost, own + (keys - 1) * (own + cost))
        return ahead / (drain_rate * share)
