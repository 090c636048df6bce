from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.ratelimit import TIME_EPSILON_S, LogEntry, LogState, Quota, SlidingWindowLog
from tests.policies.scenarios import admitted, calls, drive, origins, quotas


def test_at_most_limit_in_a_window_then_oldest_expire() -> None:
    log = SlidingWindowLog(Quota(limit=3, period_s=10.0, burst=50))
    state: LogState | None = None
    for now in (0.0, 2.0, 4.0):
        decision, state = log.take(state, now=now)
        assert decision.allowed
    assert state == (LogEntry(0.0, 1), LogEntry(2.0, 1), LogEntry(4.0, 1))
    refused, same = log.take(state, now=5.0, cost=2)
    assert not refused.allowed
    assert same is state
    assert refused.retry_after_s == pytest.approx(7.0)  # entries at 0 and 2 must expire
    assert refused.reset_after_s == pytest.approx(9.0)
    assert refused.remaining == 0
    decision, state = log.take(state, now=10.0)  # the entry at 0 expires exactly at 10
    assert decision.allowed
    assert state == (LogEntry(2.0, 1), LogEntry(4.0, 1), LogEntry(10.0, 1))


def test_takes_at_one_instant_merge() -> None:
    log = SlidingWindowLog(Quota(limit=5, period_s=1.0))
    _, state = log.take(None, now=1.0, cost=2)
    decision, state = log.take(state, now=1.0, cost=2)
    assert state == (LogEntry(1.0, 4),)
    assert decision.remaining == 1


def test_cost_above_limit_never_fits() -> None:
    log = SlidingWindowLog(Quota(limit=3, period_s=1.0))
    decision, state = log.take(None, now=0.0, cost=4)
    assert not decision.allowed
    assert decision.retry_after_s == math.inf
    assert state is None


def test_peek_changes_nothing() -> None:
    log = SlidingWindowLog(Quota(limit=3, period_s=1.0))
    _, state = log.take(None, now=0.0)
    decision, same = log.take(state, now=0.5, cost=0)
    assert decision.allowed
    assert decision.remaining == 2
    assert same is state


def test_refund_removes_the_newest_units() -> None:
    log = SlidingWindowLog(Quota(limit=10, period_s=10.0))
    state: LogState | None = None
    for now, cost in ((0.0, 3), (1.0, 2), (2.0, 4)):
        _, state = log.take(state, now=now, cost=cost)
    assert log.refund(state, now=3.0, cost=5) == (LogEntry(0.0, 3), LogEntry(1.0, 1))
    assert log.refund(state, now=3.0, cost=4) == (LogEntry(0.0, 3), LogEntry(1.0, 2))
    assert log.refund(state, now=3.0, cost=99) == ()
    assert log.refund(state, now=10.5, cost=1) == (LogEntry(1.0, 2), LogEntry(2.0, 3))
    assert log.refund(None, now=0.0, cost=1) is None


def test_ttl_is_time_until_the_newest_entry_expires() -> None:
    log = SlidingWindowLog(Quota(limit=3, period_s=10.0))
    assert log.ttl_s(None, now=0.0) == 0.0
    assert log.ttl_s((), now=0.0) == 0.0
    _, state = log.take(None, now=1.0)
    _, state = log.take(state, now=4.0)
    assert log.ttl_s(state, now=5.0) == pytest.approx(9.0)
    assert log.ttl_s(state, now=20.0) == 0.0


def test_an_earlier_now_is_read_as_the_newest_entry() -> None:
    log = SlidingWindowLog(Quota(limit=1, period_s=10.0))
    _, state = log.take(None, now=100.0)
    refused, _ = log.take(state, now=50.0)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(10.0)  # measured from 100, not 50


@settings(max_examples=150, deadline=None)
@given(data=st.data(), quota=quotas, origin=origins)
def test_never_more_than_limit_in_any_window(
    data: st.DataObject, quota: Quota, origin: float
) -> None:
    log = SlidingWindowLog(quota)
    made = drive(log, origin, data.draw(calls(quota)))
    taken = admitted(made)
    for last_at, _ in taken:
        window = [
            c
            for at, c in taken
            if at <= last_at and last_at - at < quota.period_s - 2 * TIME_EPSILON_S
        ]
        assert sum(window) <= quota.limit
    for call in made:  # bounded state: at most `limit` entries, each holding >= 1 unit
        state = log.take(call.before, now=call.now, cost=call.cost)[1]
        assert state is None or len(state) <= quota.limit


@settings(max_examples=150, deadline=None)
@given(data=st.data(), quota=quotas, origin=origins)
def test_remaining_counts_the_unit_takes_left(
    data: st.DataObject, quota: Quota, origin: float
) -> None:
    log = SlidingWindowLog(quota)
    for call in drive(log, origin, data.draw(calls(quota))):
        decision, state = log.take(call.before, now=call.now, cost=call.cost)
        if not decision.allowed:
            continue
        for _ in range(decision.remaining):
            unit, state = log.take(state, now=call.now)
            assert unit.allowed
        assert not log.take(state, now=call.now)[0].allowed
