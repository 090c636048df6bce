from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.breaker import BreakerConfig, BreakerState, CircuitBreaker

CONFIG = BreakerConfig(failure_threshold=3, open_s=2.0)


def tripped(now: float = 0.0) -> CircuitBreaker:
    breaker = CircuitBreaker(CONFIG)
    for _ in range(3):
        assert breaker.allow(now=now)
        breaker.record_failure(now=now)
    assert breaker.state is BreakerState.OPEN
    return breaker


def test_closed_lets_everything_through_and_successes_reset_the_run() -> None:
    breaker = CircuitBreaker(CONFIG)
    for step in range(10):
        assert breaker.allow(now=float(step))
        breaker.record_failure(now=float(step))
        breaker.record_failure(now=float(step))
        breaker.record_success(now=float(step))
    stats = breaker.statistics()
    assert stats.state is BreakerState.CLOSED
    assert stats.consecutive_failures == 0
    assert (stats.failures, stats.successes, stats.opened, stats.rejected) == (20, 10, 0, 0)
    assert stats.probe_at is None


def test_opens_after_threshold_consecutive_failures_and_refuses_until_open_s() -> None:
    breaker = tripped(now=10.0)
    assert not breaker.allow(now=10.0)
    assert not breaker.allow(now=11.999)
    stats = breaker.statistics()
    assert stats.opened == 1
    assert stats.rejected == 2
    assert stats.consecutive_failures == 3
    assert stats.probe_at == 12.0


def test_half_open_lets_exactly_one_probe_through() -> None:
    breaker = tripped(now=10.0)
    assert breaker.allow(now=12.0)
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow(now=12.0)
    assert not breaker.allow(now=13.5)
    assert breaker.statistics().probe_at == 14.0


def test_a_successful_probe_closes() -> None:
    breaker = tripped()
    assert breaker.allow(now=2.5)
    breaker.record_success(now=2.6)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.statistics().consecutive_failures == 0
    assert all(breaker.allow(now=2.7) for _ in range(5))


def test_a_failed_probe_reopens_and_restarts_the_timer() -> None:
    breaker = tripped()
    assert breaker.allow(now=2.0)
    breaker.record_failure(now=2.5)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow(now=4.4)
    assert breaker.allow(now=4.5)
    assert breaker.statistics().opened == 2


def test_a_lost_probe_is_replaced_after_open_s() -> None:
    breaker = tripped()
    assert breaker.allow(now=2.0)  # this probe never reports
    assert not breaker.allow(now=3.9)
    assert breaker.allow(now=4.0)
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow(now=4.0)


def test_outcomes_reported_while_open_are_counted_but_ignored() -> None:
    breaker = tripped()
    breaker.record_success(now=0.5)  # a call started before the breaker opened
    breaker.record_failure(now=0.5)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow(now=1.9)
    assert breaker.allow(now=2.0)  # the timer was not restarted by the late failure
    stats = breaker.statistics()
    assert (stats.successes, stats.failures, stats.opened) == (1, 4, 1)


def test_statistics_is_a_frozen_snapshot() -> None:
    breaker = tripped()
    before = breaker.statistics()
    breaker.allow(now=5.0)
    assert before.state is BreakerState.OPEN
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.opened = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"failure_threshold": 0}, "breaker.failure_threshold"),
        ({"failure_threshold": 1.5}, "breaker.failure_threshold"),
        ({"failure_threshold": True}, "breaker.failure_threshold"),
        ({"open_s": 0}, "breaker.open_s"),
        ({"open_s": -1.0}, "breaker.open_s"),
        ({"open_s": math.inf}, "breaker.open_s"),
        ({"open_s": math.nan}, "breaker.open_s"),
        ({"open_s": "1"}, "breaker.open_s"),
    ],
)
def test_invalid_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BreakerConfig(**kwargs)  # type: ignore[arg-type]


def test_defaults() -> None:
    breaker = CircuitBreaker()
    assert breaker.config == BreakerConfig(failure_threshold=5, open_s=1.0)
    assert breaker.state is BreakerState.CLOSED
    assert "CLOSED" in repr(breaker)


events = st.lists(
    st.tuples(st.floats(0.0, 3.0), st.sampled_from(["allow", "success", "failure"])),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(events=events)
def test_never_more_than_one_probe_per_open_s_while_not_closed(
    events: list[tuple[float, str]],
) -> None:
    breaker = CircuitBreaker(CONFIG)
    now = 0.0
    last_probe_at = -math.inf
    for step, event in events:
        now += step
        was_closed = breaker.state is BreakerState.CLOSED
        if event == "allow":
            if breaker.allow(now=now) and not was_closed:
                assert now - last_probe_at >= CONFIG.open_s
                last_probe_at = now
        elif event == "success":
            breaker.record_success(now=now)
        else:
            breaker.record_failure(now=now)
        stats = breaker.statistics()
        if stats.state is BreakerState.CLOSED:
            assert stats.consecutive_failures < CONFIG.failure_threshold
        else:
            assert stats.probe_at is not None
