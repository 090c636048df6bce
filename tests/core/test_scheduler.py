"""The scheduler facade: every request ends once, the window holds, tiers go in weight order."""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler.core import (
    Admit,
    AIMDConfig,
    AIMDController,
    FixedController,
    Outcome,
    Queued,
    Request,
    Sample,
    Scheduler,
    SchedulerConfig,
    Shed,
    ShedReason,
    Ticket,
    TierConfig,
)

TIERS = (
    TierConfig("enterprise", 8, max_wait_s=30, max_depth=50),
    TierConfig("pro", 3, max_wait_s=10, max_depth=20),
    TierConfig("free", 1, max_wait_s=2, max_depth=10, shed_on_overload=True),
)
ids = itertools.count()


def req(tier: str, now: float, key: str = "k") -> Request:
    return Request(next(ids), "t", tier, key, "m", 1.0, now)


def test_admits_at_once_then_queues_then_sheds_when_full() -> None:
    core = Scheduler(SchedulerConfig(TIERS), FixedController(1), now=0)
    assert isinstance(core.submit(req("free", 0), now=0), Admit)
    for _ in range(10):
        assert isinstance(core.submit(req("free", 0), now=0), Queued)
    shed = core.submit(req("free", 0), now=0)
    assert isinstance(shed, Shed) and shed.reason is ShedReason.QUEUE_FULL
    counts = {t.name: t for t in core.statistics().tiers}["free"]
    assert counts.submitted == 12 and counts.admitted == 1 and counts.shed["queue_full"] == 1


def test_enterprise_goes_ahead_of_free_by_weight() -> None:
    core = Scheduler(SchedulerConfig(TIERS), FixedController(1), now=0)
    first = core.submit(req("free", 0), now=0)
    assert isinstance(first, Admit)
    for _ in range(9):
        core.submit(req("free", 0), now=0)
        core.submit(req("enterprise", 0), now=0)
    order = []
    ticket = first.ticket
    for n in range(10):
        core.finish(ticket, Sample(0.1))
        (admit,) = core.poll(now=n)
        order.append(admit.request.tier)
        ticket = admit.ticket
    assert Counter(order[:9])["enterprise"] >= 8


def test_free_is_shed_at_once_while_congested_and_others_wait() -> None:
    aimd = AIMDController(AIMDConfig(initial_limit=1, target_latency_s=1))
    core = Scheduler(SchedulerConfig(TIERS), aimd, now=0)
    first = core.submit(req("pro", 0), now=0)
    assert isinstance(first, Admit)
    core.finish(first.ticket, Sample(10.0))  # far over target
    core.tick(now=0.25)
    assert aimd.congested
    core.submit(req("pro", 1), now=1)  # takes the window
    shed = core.submit(req("free", 1), now=1)
    assert isinstance(shed, Shed) and shed.reason is ShedReason.OVERLOAD
    assert isinstance(core.submit(req("enterprise", 1), now=1), Queued)


def test_expiry_is_due_at_the_deadline() -> None:
    core = Scheduler(SchedulerConfig(TIERS), FixedController(1), now=0)
    core.submit(req("free", 0), now=0)
    core.submit(req("free", 0.5), now=0.5)
    assert core.next_deadline(now=0.5) == 2.5
    assert core.expire(now=2.4) == []
    (shed,) = core.expire(now=2.5)
    assert shed.reason is ShedReason.DEADLINE and shed.queued_s == 2.0


def test_draining_refuses_new_arrivals() -> None:
    core = Scheduler(SchedulerConfig(TIERS), FixedController(4), now=0)
    core.drain()
    shed = core.submit(req("enterprise", 0), now=0)
    assert isinstance(shed, Shed) and shed.reason is ShedReason.DRAINING


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals, completions, expiries, cancels and ticks: nothing lost, window held."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.aimd = AIMDController(AIMDConfig(initial_limit=3, max_limit=6, cooldown_s=0.5))
        self.core = Scheduler(SchedulerConfig(TIERS), self.aimd, now=0)
        self.inflight: list[Ticket] = []
        self.queued: set[int] = set()
        self.ended: set[int] = set()

    def _take(self, admits: list[Admit]) -> None:
        for admit in admits:
            self.queued.discard(admit.request.id)
            self.inflight.append(admit.ticket)

    @rule(tier=st.sampled_from([t.name for t in TIERS]), key=st.sampled_from("abc"))
    def submit(self, tier: str, key: str) -> None:
        request = req(tier, self.now, key)
        decision = self.core.submit(request, now=self.now)
        if isinstance(decision, Admit):
            self.inflight.append(decision.ticket)
        elif isinstance(decision, Queued):
            self.queued.add(request.id)
        else:
            self.ended.add(request.id)

    @rule()
    def poll(self) -> None:
        self._take(self.core.poll(now=self.now))

    @precondition(lambda self: self.inflight)
    @rule(i=st.integers(0, 100), latency=st.floats(0.01, 20), drop=st.booleans())
    def finish(self, i: int, latency: float, drop: bool) -> None:
        ticket = self.inflight.pop(i % len(self.inflight))
        outcome = Outcome.DROPPED if drop else Outcome.COMPLETED
        self.core.finish(ticket, Sample(latency, outcome))
        self.ended.add(ticket.request.id)

    @precondition(lambda self: self.queued)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.queued)))
        assert self.core.cancel(request_id)
        self.queued.discard(request_id)
        self.ended.add(request_id)

    @rule(dt=st.floats(0, 3))
    def advance(self, dt: float) -> None:
        self.now += dt
        for shed in self.core.expire(now=self.now):
            self.queued.remove(shed.request.id)
            self.ended.add(shed.request.id)
        self.core.tick(now=self.now)

    @invariant()
    def window_holds(self) -> None:
        assert self.core.gate.inflight == len(self.inflight)
        # the limit may shrink under in-flight work, but admissions never push past it
        assert self.core.depth == len(self.queued)

    @invariant()
    def poll_never_overfills(self) -> None:
        before = self.core.gate.inflight
        admits = self.core.poll(now=self.now)
        self._take(admits)
        if admits:
            assert self.core.gate.inflight <= self.core.gate.window()
        else:
            assert self.core.depth == 0 or before >= self.core.gate.window()

    @invariant()
    def nothing_is_both_ended_and_pending(self) -> None:
        live = self.queued | {t.request.id for t in self.inflight}
        assert not (live & self.ended)


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)
