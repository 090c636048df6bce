"""What a run measured: per-tier counts and percentiles, and the time series.

Every offered request ends in exactly one outcome:

    offered = completed + dropped + refused_by_quota + shed + served_from_cache
              + degraded_to_fallback

(`completed + dropped` are the admitted ones). Goodput counts the completed requests whose
latency, from arrival to completion and so including the queue wait, is within the tier's SLO.
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

OUTCOMES = (
    "completed",
    "refused_by_quota",
    "shed",
    "served_from_cache",
    "degraded_to_fallback",
    "dropped",
)


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values by nearest rank; nan when empty."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 when all equal, 1/n at worst."""
    if not values:
        return math.nan
    squares = sum(v * v for v in values)
    if squares == 0:
        return 1.0
    total = sum(values)
    return total * total / (len(values) * squares)


@dataclass(frozen=True, slots=True)
class Percentiles:
    p50: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: array[float] | list[float], *, zeros: int = 0) -> Percentiles:
        """Percentiles of `values` plus `zeros` more values of 0.0 (kept apart, unsorted)."""
        ordered = sorted(values)
        n = len(ordered) + zeros
        if n == 0:
            return cls(math.nan, math.nan, math.nan)

        def rank(q: float) -> float:
            i = min(n - 1, max(0, math.ceil(q * n) - 1)) - zeros
            return 0.0 if i < 0 else ordered[i]

        return cls(rank(0.5), rank(0.95), rank(0.99))


@dataclass(frozen=True, slots=True)
class TierResult:
    """One tier's outcome counts, latencies and fairness over the run.

    `fairness` is Jain's index over the keys that offered traffic, of each key's served share
    (completed / offered): 1 when every key got the same share of what it asked for.
    """

    name: str
    slo_latency_s: float
    shed_budget: float
    offered: int
    admitted: int
    completed: int
    goodput: int
    refused_by_quota: int
    shed: int
    served_from_cache: int
    degraded_to_fallback: int
    dropped: int
    shed_reasons: dict[str, int]
    latency_s: Percentiles
    queue_wait_s: Percentiles
    shed_wait_s: Percentiles  # arrival to the shed decision, of requests the core shed
    fairness: float
    first_shed_at: float
    mean_prompt_tokens: float
    mean_output_tokens: float

    @property
    def goodput_ratio(self) -> float:
        """Goodput over what the quota let through (refusals are the caller's own limit)."""
        asked = self.offered - self.refused_by_quota
        return self.goodput / asked if asked else 1.0

    @property
    def shed_ratio(self) -> float:
        """Requests not served by the main pool for load reasons, over what the quota let in."""
        asked = self.offered - self.refused_by_quota
        not_served = self.shed + self.served_from_cache + self.degraded_to_fallback + self.dropped
        return not_served / asked if asked else 0.0

    def outcome_total(self) -> int:
        return sum(getattr(self, name) for name in OUTCOMES)


@dataclass(slots=True)
class TimeSeries:
    """Columns sampled every `sample_s`; per-tier counts are per interval, not cumulative."""

    sample_s: float
    t: list[float] = field(default_factory=list)
    limit: list[float] = field(default_factory=list)
    pressure: list[float] = field(default_factory=list)
    latency_signal_s: list[float] = field(default_factory=list)
    p99_latency_s: list[float] = field(default_factory=list)
    inflight: list[int] = field(default_factory=list)
    backends_alive: list[int] = field(default_factory=list)
    offered: dict[str, list[int]] = field(default_factory=dict)
    admitted: dict[str, list[int]] = field(default_factory=dict)
    goodput: dict[str, list[int]] = field(default_factory=dict)
    shed: dict[str, list[int]] = field(default_factory=dict)
    depth: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SpikeResult:
    """Goodput while a spike lasted, against the pool's capacity."""

    at_s: float
    end_s: float
    offered_rps: float
    goodput_rps: float
    capacity_rps: float

    @property
    def goodput_vs_capacity(self) -> float:
        return self.goodput_rps / self.capacity_rps if self.capacity_rps > 0 else math.nan


@dataclass(frozen=True, slots=True)
class SimResult:
    scenario: str
    seed: int
    controller: str
    duration_s: float
    ended_at: float
    requests: int  # offered
    events: int  # heap events popped (stale wake-ups included)
    capacity_rps: float
    tiers: tuple[TierResult, ...]
    series: TimeSeries
    spikes: tuple[SpikeResult, ...]
    limit_increases: int
    limit_decreases: int
    replica_limits: tuple[float, ...] = ()  # each replica's limit when arrivals ended
    utilization: float = math.nan  # mean running / slots while requests were queued

    def tier(self, name: str) -> TierResult:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(f"unknown tier {name!r}")

    @property
    def goodput(self) -> int:
        return sum(t.goodput for t in self.tiers)

    @property
    def goodput_ratio(self) -> float:
        asked = sum(t.offered - t.refused_by_quota for t in self.tiers)
        return self.goodput / asked if asked else 1.0

    def limit_oscillation(self) -> float:
        """Mean absolute change of the limit between samples over its mean (0 = flat)."""
        limits = self.series.limit
        if len(limits) < 2:
            return 0.0
        mean = sum(limits) / len(limits)
        steps = sum(abs(b - a) for a, b in itertools.pairwise(limits))
        return steps / (len(limits) - 1) / mean if mean > 0 else 0.0
