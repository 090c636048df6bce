"""Hypothesis strategies and a driver shared by the rate-limit tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from policies.ratelimit import (
    GCRA,
    Quota,
    RateAlgorithm,
    RateDecision,
    SlidingWindowCounter,
    SlidingWindowLog,
)

AlgorithmFactory = Callable[[Quota], RateAlgorithm[Any]]
ALGORITHMS: list[AlgorithmFactory] = [GCRA, SlidingWindowLog, SlidingWindowCounter]
ALGORITHM_IDS = ["gcra", "log", "counter"]

quotas = st.builds(
    Quota,
    limit=st.integers(1, 20),
    period_s=st.sampled_from([0.5, 1.0, 3.0, 60.0]) | st.floats(0.1, 100.0),
    burst=st.none() | st.integers(1, 25),
)

# Clock origins: zero, a monotonic clock's seconds since boot, Redis TIME's epoch seconds.
origins = st.sampled_from([0.0, 12_345.678, 1.7e9])


@st.composite
def calls(draw: st.DrawFn, quota: Quota) -> list[tuple[float, int]]:
    """A sequence of (time step in seconds, cost), steps often 0 so takes share an instant."""
    step = st.just(0.0) | st.floats(0.0, 1.5).map(lambda f: f * quota.period_s)
    cost = st.integers(0, quota.limit + 2) | st.just(1)
    return draw(st.lists(st.tuples(step, cost), max_size=60))


@dataclass(frozen=True)
class Call:
    """One take: when, how much, what the state was before, and the decision."""

    now: float
    cost: int
    before: Any
    decision: RateDecision


def drive(
    algorithm: RateAlgorithm[Any], origin: float, steps: list[tuple[float, int]]
) -> list[Call]:
    """Apply the takes in order from a fresh state; return every call."""
    state: Any = None
    now = origin
    made: list[Call] = []
    for step, cost in steps:
        now += step
        decision, after = algorithm.take(state, now=now, cost=cost)
        made.append(Call(now, cost, state, decision))
        state = after
    return made


def admitted(made: list[Call]) -> list[tuple[float, int]]:
    """(time, cost) of the allowed takes that took something."""
    return [(c.now, c.cost) for c in made if c.decision.allowed and c.cost > 0]
