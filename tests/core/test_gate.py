"""The gate: window mode never exceeds the window, rate mode never exceeds rate x T + burst."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler.core import Gate, GateConfig, GateMode, Outcome, Request, Ticket

ids = itertools.count()


def req() -> Request:
    return Request(next(ids), "t", "free", "k", "m", 1.0, 0.0)


class WindowGate(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.gate = Gate(GateConfig(GateMode.WINDOW), limit=4, now=0)
        self.tickets: list[Ticket] = []

    @rule()
    def admit(self) -> None:
        before = self.gate.inflight
        ticket = self.gate.admit(req(), now=self.now)
        if ticket is None:
            assert before >= self.gate.window()
        else:
            self.tickets.append(ticket)
            assert self.gate.inflight <= self.gate.window()

    @precondition(lambda self: self.tickets)
    @rule(index=st.integers(0, 1000), outcome=st.sampled_from(list(Outcome)))
    def release(self, index: int, outcome: Outcome) -> None:
        ticket = self.tickets.pop(index % len(self.tickets))
        self.gate.release(ticket, outcome)

    @rule(limit=st.floats(0.5, 20))
    def set_limit(self, limit: float) -> None:
        self.gate.set_limit(limit, now=self.now)

    @rule(dt=st.floats(0, 2))
    def advance(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def inflight_matches_tickets(self) -> None:
        assert self.gate.inflight == len(self.tickets)


TestWindowGate = WindowGate.TestCase
TestWindowGate.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


@settings(max_examples=60, deadline=None)
@given(
    rate=st.floats(0.5, 200),
    gaps=st.lists(st.floats(0, 0.2), min_size=1, max_size=300),
)
def test_rate_mode_admits_at_most_rate_times_t_plus_burst(rate: float, gaps: list[float]) -> None:
    config = GateConfig(GateMode.RATE, burst_s=0.05)
    gate = Gate(config, limit=rate, now=0.0)
    burst = max(1.0, rate * config.burst_s)
    now, times = 0.0, []
    for gap in gaps:
        now += gap
        ticket = gate.admit(req(), now=now)
        if ticket is not None:
            times.append(now)
            gate.release(ticket, Outcome.COMPLETED)
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= rate * (times[j] - start) + burst + 1e-9


def test_rate_mode_tells_when_it_refills() -> None:
    gate = Gate(GateConfig(GateMode.RATE, burst_s=0.05), limit=10, now=0.0)
    assert gate.admit(req(), now=0.0) is not None
    assert gate.admit(req(), now=0.0) is None
    assert gate.ready_at(now=0.0) == pytest.approx(0.1)
    assert gate.admit(req(), now=0.1) is not None


def test_window_mode_waits_for_a_release() -> None:
    gate = Gate(GateConfig(GateMode.WINDOW), limit=1, now=0.0)
    ticket = gate.admit(req(), now=0.0)
    assert ticket is not None
    assert gate.ready_at(now=5.0) == math.inf
    gate.release(ticket, Outcome.DROPPED)
    assert gate.ready_at(now=5.0) == 5.0
    assert gate.statistics().dropped == 1


def test_a_ticket_ends_once() -> None:
    gate = Gate(GateConfig(), limit=2, now=0.0)
    ticket = gate.admit(req(), now=0.0)
    assert ticket is not None
    gate.release(ticket, Outcome.COMPLETED)
    with pytest.raises(RuntimeError, match="already ended"):
        gate.release(ticket, Outcome.IGNORED)


def test_bypass_counts_in_flight_without_asking() -> None:
    gate = Gate(GateConfig(), limit=1, now=0.0)
    assert gate.admit(req(), now=0.0) is not None
    bypass = gate.admit_bypass(req(), now=0.0)
    assert gate.inflight == 2
    gate.release(bypass, Outcome.COMPLETED)
    assert gate.inflight == 1


def test_utilization_window_and_rate() -> None:
    window = Gate(GateConfig(GateMode.WINDOW), limit=4, now=0.0)
    tickets = [window.admit(req(), now=0.0) for _ in range(2)]
    assert window.take_utilization(now=1.0) == 0.5
    for t in tickets:
        assert t is not None
        window.release(t, Outcome.COMPLETED)
    assert window.take_utilization(now=2.0) == 0.5  # the peak: 2 were in flight at 1.0
    assert window.take_utilization(now=3.0) == 0.0
    rate = Gate(GateConfig(GateMode.RATE, burst_s=1), limit=10, now=0.0)
    for _ in range(5):
        assert rate.admit(req(), now=0.0) is not None
    assert rate.take_utilization(now=1.0) == pytest.approx(0.5)


def test_zero_window_is_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        Gate(GateConfig(), limit=0, now=0.0)
    with pytest.raises(ValueError, match=r"gate\.burst_s"):
        GateConfig(GateMode.RATE, burst_s=0)


def test_room_is_how_many_admissions_succeed_in_a_row() -> None:
    for config, limit in ((GateConfig(GateMode.WINDOW), 3.7), (GateConfig(GateMode.RATE), 70.0)):
        gate = Gate(config, limit=limit, now=0.0)  # rate: a bucket of 70 x 0.05 = 3.5
        room = gate.room(now=0.0)
        assert room == 3
        assert all(gate.admit(req(), now=0.0) is not None for _ in range(room))
        assert gate.room(now=0.0) == 0
        assert gate.admit(req(), now=0.0) is None
    bypassed = Gate(GateConfig(), limit=1, now=0.0)
    bypassed.admit_bypass(req(), now=0.0)
    bypassed.admit_bypass(req(), now=0.0)
    assert bypassed.room(now=0.0) == 0  # over the window by bypass: no room, not less
