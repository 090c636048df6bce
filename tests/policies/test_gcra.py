from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.ratelimit import GCRA, TIME_EPSILON_S, Quota
from tests.policies.scenarios import admitted, calls, drive, origins, quotas


def test_idle_key_spends_its_burst_then_waits_one_interval() -> None:
    gcra = GCRA(Quota(limit=10, period_s=1.0))
    state: float | None = None
    for left in range(9, -1, -1):
        decision, state = gcra.take(state, now=0.0)
        assert decision.allowed
        assert decision.remaining == left
        assert decision.retry_after_s == 0.0
    assert state == pytest.approx(1.0)
    refused, same = gcra.take(state, now=0.0)
    assert not refused.allowed
    assert same == state
    assert refused.remaining == 0
    assert refused.retry_after_s == pytest.approx(0.1)
    assert refused.reset_after_s == pytest.approx(1.0)
    later, _ = gcra.take(state, now=0.1)
    assert later.allowed


def test_state_is_the_tat() -> None:
    gcra = GCRA(Quota(limit=4, period_s=2.0, burst=2))
    assert gcra.emission_interval_s == 0.5
    assert gcra.tolerance_s == 1.0
    decision, tat = gcra.take(None, now=10.0, cost=2)
    assert tat == 11.0
    assert decision.remaining == 0
    assert decision.reset_after_s == 1.0
    assert decision.limit == 4


def test_a_third_of_a_second_adds_up() -> None:
    # T = 1/3 is inexact: three takes of one unit must still fit a burst of three.
    gcra = GCRA(Quota(limit=3, period_s=1.0))
    state: float | None = None
    for _ in range(3):
        decision, state = gcra.take(state, now=0.0)
        assert decision.allowed
    assert not gcra.take(state, now=0.0)[0].allowed


def test_cost_above_burst_never_fits() -> None:
    gcra = GCRA(Quota(limit=10, period_s=1.0, burst=5))
    decision, state = gcra.take(None, now=0.0, cost=6)
    assert not decision.allowed
    assert decision.retry_after_s == math.inf
    assert decision.remaining == 5
    assert state is None
    assert gcra.take(None, now=0.0, cost=5)[0].allowed


def test_peek_changes_nothing() -> None:
    gcra = GCRA(Quota(limit=2, period_s=1.0))
    assert gcra.take(None, now=5.0, cost=0) == (gcra.take(None, now=5.0, cost=0)[0], None)
    _, state = gcra.take(None, now=5.0)
    decision, same = gcra.take(state, now=5.0, cost=0)
    assert decision.allowed
    assert decision.remaining == 1
    assert same == state


def test_refund_moves_the_tat_back_but_not_below_now() -> None:
    gcra = GCRA(Quota(limit=10, period_s=1.0))
    _, state = gcra.take(None, now=0.0, cost=8)
    state = gcra.refund(state, now=0.0, cost=5)
    assert state == pytest.approx(0.3)
    assert gcra.take(state, now=0.0, cost=7)[0].allowed
    assert gcra.refund(state, now=0.0, cost=100) == 0.0
    assert gcra.refund(state, now=0.2, cost=100) == 0.2
    assert gcra.refund(None, now=0.0, cost=3) is None


def test_ttl_is_time_until_the_tat() -> None:
    gcra = GCRA(Quota(limit=10, period_s=1.0))
    assert gcra.ttl_s(None, now=0.0) == 0.0
    _, state = gcra.take(None, now=0.0, cost=4)
    assert gcra.ttl_s(state, now=0.0) == pytest.approx(0.4)
    assert gcra.ttl_s(state, now=1.0) == 0.0


def test_an_earlier_now_is_only_stricter() -> None:
    gcra = GCRA(Quota(limit=2, period_s=1.0))
    _, state = gcra.take(None, now=10.0, cost=2)
    late = gcra.take(state, now=10.5)[0]
    early = gcra.take(state, now=9.0)[0]
    assert late.allowed
    assert not early.allowed
    assert early.retry_after_s == pytest.approx(1.5)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), quota=quotas, origin=origins)
def test_never_more_than_burst_plus_rate_times_interval(
    data: st.DataObject, quota: Quota, origin: float
) -> None:
    gcra = GCRA(quota)
    taken = admitted(drive(gcra, origin, data.draw(calls(quota))))
    for i, (first_at, _) in enumerate(taken):
        units = 0
        for last_at, cost in taken[i:]:
            units += cost
            bound = quota.burst + (last_at - first_at + TIME_EPSILON_S) / gcra.emission_interval_s
            assert units <= bound + 0.01


@settings(max_examples=150, deadline=None)
@given(data=st.data(), quota=quotas, origin=origins)
def test_remaining_counts_the_unit_takes_left(
    data: st.DataObject, quota: Quota, origin: float
) -> None:
    gcra = GCRA(quota)
    for call in drive(gcra, origin, data.draw(calls(quota))):
        decision, state = gcra.take(call.before, now=call.now, cost=call.cost)
        if not decision.allowed:
            continue
        for _ in range(decision.remaining):
            unit, state = gcra.take(state, now=call.now)
            assert unit.allowed
        assert not gcra.take(state, now=call.now)[0].allowed
