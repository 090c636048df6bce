from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.ratelimit import GCRA, MemoryLimiter, Quota, SlidingWindowLog
from tests.policies.scenarios import ALGORITHM_IDS, ALGORITHMS, AlgorithmFactory, quotas

matrix = pytest.mark.parametrize("factory", ALGORITHMS, ids=ALGORITHM_IDS)


def test_keys_are_limited_separately() -> None:
    limiter = MemoryLimiter(GCRA(Quota(limit=2, period_s=1.0)))
    assert limiter.take("a", now=0.0, cost=2).allowed
    assert not limiter.take("a", now=0.0).allowed
    assert limiter.take("b", now=0.0).allowed
    assert len(limiter) == 2
    assert "a" in limiter


def test_refund_gives_units_back() -> None:
    limiter = MemoryLimiter(SlidingWindowLog(Quota(limit=5, period_s=10.0)))
    assert limiter.take("k", now=0.0, cost=5).allowed
    limiter.refund("k", now=1.0, cost=3)
    assert limiter.take("k", now=1.0, cost=3).allowed
    limiter.refund("unknown", now=1.0, cost=3)
    assert "unknown" not in limiter


def test_refused_and_peeked_keys_are_not_stored() -> None:
    limiter = MemoryLimiter(GCRA(Quota(limit=2, period_s=1.0)))
    assert not limiter.take("big", now=0.0, cost=3).allowed
    assert limiter.take("peek", now=0.0, cost=0).allowed
    assert len(limiter) == 0


@matrix
def test_memory_stays_bounded_over_many_keys(factory: AlgorithmFactory) -> None:
    limiter = MemoryLimiter(factory(Quota(limit=3, period_s=1.0)))
    peak = 0
    for i in range(5000):  # a new key every 10 ms, each live for at most 2 s
        limiter.take(f"key-{i}", now=i * 0.01)
        peak = max(peak, len(limiter))
    assert peak <= 202
    stats = limiter.statistics()
    assert stats.keys == len(limiter)
    assert stats.evictions >= 4700


@matrix
@settings(max_examples=60, deadline=None)
@given(
    quota=quotas,
    ops=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.floats(0.0, 2.0),
            st.integers(0, 6),
            st.booleans(),
        ),
        max_size=80,
    ),
)
def test_eviction_never_changes_a_decision(
    factory: AlgorithmFactory, quota: Quota, ops: list[tuple[str, float, int, bool]]
) -> None:
    algorithm = factory(quota)
    limiter = MemoryLimiter(algorithm)
    reference: dict[str, Any] = {}  # the same states, never evicted
    now = 100.0
    for key, step, cost, is_refund in ops:
        now += step * quota.period_s
        if is_refund:
            limiter.refund(key, now=now, cost=cost)
            reference[key] = algorithm.refund(reference.get(key), now=now, cost=cost)
            continue
        decision, reference[key] = algorithm.take(reference.get(key), now=now, cost=cost)
        assert limiter.take(key, now=now, cost=cost) == decision
