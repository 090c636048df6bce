"""Properties every algorithm shares, run on each of them."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.ratelimit import GCRA, Quota, RateAlgorithm
from tests.policies.scenarios import (
    ALGORITHM_IDS,
    ALGORITHMS,
    AlgorithmFactory,
    calls,
    drive,
    origins,
    quotas,
)

matrix = pytest.mark.parametrize("factory", ALGORITHMS, ids=ALGORITHM_IDS)


def reset_bound_s(algorithm: RateAlgorithm[Any], quota: Quota) -> float:
    """A reset is never later than the window; a GCRA's, than its bucket takes to drain
    (one window with the default burst = limit)."""
    if isinstance(algorithm, GCRA):
        return algorithm.tolerance_s
    return quota.period_s


@matrix
@settings(max_examples=120, deadline=None)
@given(data=st.data(), quota=quotas, origin=origins)
def test_retry_after_is_honest(
    factory: AlgorithmFactory, data: st.DataObject, quota: Quota, origin: float
) -> None:
    algorithm = factory(quota)
    for call in drive(algorithm, origin, data.draw(calls(quota))):
        decision = call.decision
        if decision.allowed:
            assert decision.retry_after_s == 0.0
        elif math.isfinite(decision.retry_after_s):
            assert decision.retry_after_s > 0
            retry_at = call.now + decision.retry_after_s
            assert algorithm.take(call.before, now=retry_at, cost=call.cost)[0].allowed
        else:
            assert not algorithm.take(None, now=call.now, cost=call.cost)[0].allowed


@matrix
@settings(max_examples=80, deadline=None)
@given(data=st.data(), quota=quotas, origin=origins)
def test_refused_takes_and_peeks_keep_the_state(
    factory: AlgorithmFactory, data: st.DataObject, quota: Quota, origin: float
) -> None:
    algorithm = factory(quota)
    for call in drive(algorithm, origin, data.draw(calls(quota))):
        decision, after = algorithm.take(call.before, now=call.now, cost=call.cost)
        if not decision.allowed or call.cost == 0:
            assert after is call.before
        assert decision.remaining >= 0
        assert 0 <= decision.reset_after_s <= reset_bound_s(algorithm, quota)
        assert decision.limit == quota.limit


@matrix
@settings(max_examples=80, deadline=None)
@given(data=st.data(), quota=quotas, origin=origins, cost=st.integers(1, 25))
def test_after_the_ttl_a_state_is_as_good_as_none(
    factory: AlgorithmFactory, data: st.DataObject, quota: Quota, origin: float, cost: int
) -> None:
    algorithm = factory(quota)
    made = drive(algorithm, origin, data.draw(calls(quota)))
    if not made:
        return
    last = made[-1]
    state = algorithm.take(last.before, now=last.now, cost=last.cost)[1]
    expired_at = last.now + algorithm.ttl_s(state, now=last.now)
    assert algorithm.ttl_s(state, now=expired_at) <= 1e-9  # float rounding of now + ttl
    kept = algorithm.take(state, now=expired_at, cost=cost)[0]
    fresh = algorithm.take(None, now=expired_at, cost=cost)[0]
    assert (kept.allowed, kept.limit, kept.remaining) == (
        fresh.allowed,
        fresh.limit,
        fresh.remaining,
    )
    # durations equal up to the rounding of `now + ttl` (a TAT may lie an ulp past it)
    assert kept.retry_after_s == pytest.approx(fresh.retry_after_s, abs=1e-9)
    assert kept.reset_after_s == pytest.approx(fresh.reset_after_s, abs=1e-9)


@matrix
@settings(max_examples=80, deadline=None)
@given(data=st.data(), quota=quotas, origin=origins)
def test_a_refund_at_the_same_instant_undoes_a_take(
    factory: AlgorithmFactory, data: st.DataObject, quota: Quota, origin: float
) -> None:
    algorithm = factory(quota)
    for call in drive(algorithm, origin, data.draw(calls(quota))):
        decision, after = algorithm.take(call.before, now=call.now, cost=call.cost)
        if not decision.allowed:
            continue
        restored = algorithm.refund(after, now=call.now, cost=call.cost)
        for cost in (1, call.cost):
            undone = algorithm.take(restored, now=call.now, cost=cost)[0]
            untaken = algorithm.take(call.before, now=call.now, cost=cost)[0]
            assert (undone.allowed, undone.remaining) == (untaken.allowed, untaken.remaining)


@matrix
def test_a_refund_frees_room_for_a_later_take(factory: AlgorithmFactory) -> None:
    algorithm = factory(Quota(limit=10, period_s=10.0))
    _, state = algorithm.take(None, now=0.0, cost=10)
    assert not algorithm.take(state, now=1.0, cost=4)[0].allowed
    state = algorithm.refund(state, now=1.0, cost=6)
    assert algorithm.take(state, now=1.0, cost=4)[0].allowed
