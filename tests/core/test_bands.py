"""Priority bands: a higher band goes first, strictly; a floor keeps a lower band served; a
protected tier that is late holds the lower bands back, and only then."""

from __future__ import annotations

import itertools
import math
import re

import pytest
from hypothesis import settings
from hypothesis.stateful import invariant

from scheduler.core import (
    Admit,
    FixedController,
    Outcome,
    Queued,
    Request,
    Sample,
    Scheduler,
    SchedulerConfig,
    Shed,
    ShedReason,
    TierConfig,
    WeightedFairQueue,
)
from tests.core.test_scheduler import SchedulerMachine

ids = itertools.count()


def req(tier: str, now: float, key: str = "k") -> Request:
    return Request(next(ids), "t", tier, key, "m", 1.0, now)


def core(limit: int, *tiers: TierConfig) -> Scheduler:
    return Scheduler(SchedulerConfig(tiers), FixedController(limit), now=0.0)


GOLD = TierConfig("gold", 1, max_wait_s=30, max_depth=100, priority=1, protect_latency_s=2.0)


def lower(
    name: str = "free", weight: float = 1, *, floor: float = 0.0, fail_fast: bool = False
) -> TierConfig:
    return TierConfig(name, weight, 5, 100, fail_fast=fail_fast, floor=floor)


def test_a_higher_band_goes_first_whatever_the_weights() -> None:
    # free weighs 100 times gold, and in one band it would take 100 of every 101 slots
    sched = core(1, GOLD, lower(weight=100))
    first = sched.submit(req("free", 0), now=0)
    assert isinstance(first, Admit)
    for _ in range(5):
        assert isinstance(sched.submit(req("free", 0), now=0), Queued)
        assert isinstance(sched.submit(req("gold", 0), now=0), Queued)
    order, ticket = [], first.ticket
    for step in range(1, 11):
        sched.finish(ticket, Sample(0.5))
        (admit,) = sched.poll(now=step)
        order.append(admit.request.tier)
        ticket = admit.ticket
    assert order == ["gold"] * 5 + ["free"] * 5


def test_inside_a_band_the_weights_decide() -> None:
    pro = lower("pro", 3)
    sched = core(1, GOLD, pro, lower())
    first = sched.submit(req("pro", 0), now=0)
    assert isinstance(first, Admit)
    for _ in range(8):
        sched.submit(req("pro", 0), now=0)
        sched.submit(req("free", 0), now=0)
    order, ticket = [], first.ticket
    for step in range(1, 9):
        sched.finish(ticket, Sample(0.5))
        (admit,) = sched.poll(now=step)
        order.append(admit.request.tier)
        ticket = admit.ticket
    assert order.count("pro") == 6 and order.count("free") == 2


def test_a_floor_keeps_a_lower_band_served_under_a_higher_bands_flood() -> None:
    sched = core(4, GOLD, lower(floor=0.25))  # a quarter of 4 slots: 1
    tickets = []
    for _ in range(4):
        decision = sched.submit(req("gold", 0), now=0)
        assert isinstance(decision, Admit)
        tickets.append(decision.ticket)
    for _ in range(20):
        sched.submit(req("gold", 0), now=0)
        sched.submit(req("free", 0), now=0)
    served = []
    for step in range(1, 21):  # one call ends a second: who takes its slot
        ended = tickets.pop(0)
        sched.finish(ended, Sample(0.5))
        (admit,) = sched.poll(now=step)
        served.append(admit.request.tier)
        tickets.append(admit.ticket)
    # the free call admitted first holds its floor slot until it ends, then the next goes
    assert served[0] == "free" and served.count("free") == 5
    assert all(served[i] == "free" for i in range(0, 20, 4))


def test_without_a_floor_a_lower_band_waits_for_the_higher_band() -> None:
    sched = core(2, GOLD, lower())
    open_calls = []
    for _ in range(2):
        decision = sched.submit(req("gold", 0), now=0)
        assert isinstance(decision, Admit)
        open_calls.append(decision.ticket)
    for _ in range(5):
        sched.submit(req("gold", 0), now=0)
        sched.submit(req("free", 0), now=0)
    served = []
    for step in range(1, 11):
        sched.finish(open_calls.pop(0), Sample(0.5))
        for admit in sched.poll(now=step):
            served.append(admit.request.tier)
            open_calls.append(admit.ticket)
    assert served == ["gold"] * 5 + ["free"] * 5


def late_gold(sched: Scheduler, now: float, latency_s: float) -> None:
    """A gold call admitted at `now` that ends `latency_s` later."""
    admit = sched.submit(req("gold", now), now=now)
    assert isinstance(admit, Admit)
    sched.finish(admit.ticket, Sample(latency_s))


def fill_free(sched: Scheduler, now: float, count: int) -> list[Admit]:
    admits = []
    for _ in range(count):
        decision = sched.submit(req("free", now), now=now)
        if isinstance(decision, Admit):
            admits.append(decision)
    return admits


def test_a_late_protected_call_cuts_the_lower_bands_ceiling() -> None:
    sched = core(10, GOLD, lower())
    assert len(fill_free(sched, 0, 5)) == 5  # with nothing late, free may use the window
    late_gold(sched, 0.0, latency_s=3.0)  # over gold's 2 s
    sched.tick(now=0.25)
    assert sched.statistics().band_ceilings == (10.0, 7.0)
    # the ceiling is 10 * 0.7 = 7: free holds 5, so two more and then no more
    assert len(fill_free(sched, 0.3, 5)) == 2
    decision = sched.submit(req("gold", 0.3), now=0.3)
    assert isinstance(decision, Admit)  # gold itself is not held back


def test_a_protected_call_late_while_still_in_flight_cuts_at_once() -> None:
    sched = core(10, GOLD, lower())
    admit = sched.submit(req("gold", 0.0), now=0.0)
    assert isinstance(admit, Admit)
    fill_free(sched, 0.0, 5)
    sched.tick(now=1.0)  # 1 s old: within its 2 s
    assert len(fill_free(sched, 1.0, 5)) == 4  # the window is full
    sched.tick(now=2.5)  # 2.5 s old and not done: the lower band gives way now
    sched.finish(admit.ticket, Sample(2.5))
    assert fill_free(sched, 2.5, 1) == []  # free holds 9, over its ceiling of 7


def test_on_time_protected_calls_leave_the_lower_band_the_whole_window() -> None:
    """Spare capacity: gold within its target all along, free is not held back."""
    sched = core(8, GOLD, lower())
    now = 0.0
    for step in range(40):
        now = step * 0.25
        late_gold(sched, now, latency_s=1.0)
        sched.tick(now=now)
    assert len(fill_free(sched, now, 10)) == 8


def test_the_ceiling_grows_back_once_the_protected_tier_is_on_time_again() -> None:
    sched = core(10, GOLD, lower())
    late_gold(sched, 0.0, latency_s=3.0)
    sched.tick(now=0.25)  # ceiling 7
    calls = []
    now = 0.25
    for step in range(1, 17):  # 4 s of 1 s gold calls: a slot per 2 targets, +1
        now = 0.25 + step * 0.25
        calls.append(sched.submit(req("gold", now), now=now))
        if len(calls) > 4:
            done = calls.pop(0)
            assert isinstance(done, Admit)
            sched.finish(done.ticket, Sample(1.0))
        sched.tick(now=now)
    for done in calls:
        assert isinstance(done, Admit)
        sched.finish(done.ticket, Sample(1.0))
    assert len(fill_free(sched, now, 10)) == 8
    for step in range(1, 9):  # gold gone for 2 s (its target): the window opens
        sched.tick(now=now + step * 0.25)
    assert len(sched.poll(now=now + 2.0)) == 2  # the 2 queued: 10 in flight, the window


def test_a_lifted_ceiling_applies_again_as_it_was_when_the_protected_tier_returns() -> None:
    sched = core(10, GOLD, lower())
    late_gold(sched, 0.0, latency_s=3.0)
    sched.tick(now=0.25)  # ceiling 7
    late_gold(sched, 2.5, latency_s=3.0)
    sched.tick(now=2.5)  # a target later: 4.9
    for step in range(1, 9):  # gold gone for 2 s: the ceiling is lifted, not reset
        sched.tick(now=2.5 + step * 0.25)
    assert len(fill_free(sched, 4.5, 6)) == 6  # past the ceiling of about 5
    assert sched.statistics().band_ceilings[1] < 6
    assert isinstance(sched.submit(req("gold", 4.6), now=4.6), Admit)
    # gold is back: the ceiling applies at once, before any tick; reset to the window, it
    # would have let 3 more in (10 in flight), and taken 8 cuts to come back down
    assert fill_free(sched, 4.6, 3) == []


def test_a_lower_band_behind_strict_priority_is_shed_on_arrival() -> None:
    """Fail fast sees the band: with gold queued and no floor, free can count on nothing."""
    sched = core(2, GOLD, lower(fail_fast=True))
    first = sched.submit(req("gold", 0), now=0)
    second = sched.submit(req("gold", 0), now=0)
    assert isinstance(first, Admit) and isinstance(second, Admit)
    sched.finish(first.ticket, Sample(1.0))  # the pace is known: 2 slots per second
    again = sched.submit(req("gold", 1), now=1)
    assert isinstance(again, Admit)
    for _ in range(3):
        sched.submit(req("gold", 1), now=1)
    assert isinstance(sched.submit(req("free", 1), now=1), Queued)  # nothing queued: 0 s
    shed = sched.submit(req("free", 1), now=1)
    assert isinstance(shed, Shed) and shed.reason is ShedReason.PREDICTED_WAIT
    assert shed.predicted_wait_s == math.inf


def test_a_lower_bands_wait_is_predicted_at_its_ceilings_pace() -> None:
    sched = core(10, GOLD, lower(fail_fast=True))
    late_gold(sched, 0.0, latency_s=3.0)  # ceiling 7; mean call 3 s
    sched.tick(now=0.25)
    fill_free(sched, 0.25, 8)  # 7 admitted, 1 queued
    # 1 queued ahead, 7 slots of 3 s calls: 7/3 a second; the queue's own lone key
    assert sched.predict_wait_s(req("free", 0.25, key="other"), now=0.25) == pytest.approx(
        1 / (7 / 3)
    )


def test_ignored_and_dropped_calls_free_their_band_slot_without_a_signal() -> None:
    sched = core(4, GOLD, lower())
    admit = sched.submit(req("gold", 0), now=0)
    assert isinstance(admit, Admit)
    sched.finish(admit.ticket, Sample(9.0, Outcome.DROPPED))  # no answer: says nothing
    ignored = sched.submit(req("gold", 0), now=0)
    assert isinstance(ignored, Admit)
    sched.ignore(ignored.ticket)
    sched.tick(now=0.25)
    assert len(fill_free(sched, 0.25, 5)) == 4


def test_one_band_is_the_plain_fair_queue() -> None:
    queue = WeightedFairQueue([lower("a"), lower("b")])
    assert queue.bands == 1
    assert core(1, lower("a"), lower("b")).statistics().band_ceilings == ()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"floor": 1.0}, "tiers.t.floor must be in [0, 1), got 1.0"),
        ({"floor": -0.1}, "tiers.t.floor must be in [0, 1), got -0.1"),
        ({"protect_latency_s": -1.0}, "tiers.t.protect_latency_s must be >= 0 (0: off)"),
    ],
)
def test_bad_band_options_name_the_field(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TierConfig("t", 1, max_wait_s=1, max_depth=1, **options)  # type: ignore[arg-type]


BANDED = (
    TierConfig("enterprise", 8, 30, 50, priority=1, protect_latency_s=1.0),
    TierConfig("pro", 3, 10, 20, floor=0.2),
    TierConfig("free", 1, 2, 10, shed_on_overload=True, fail_fast=True),
)


class BandsMachine(SchedulerMachine):
    """The scheduler's invariants with bands, ceilings cut and floors: nothing lost, the
    window held, each band's in-flight count true, and a poll that admits nothing while
    there is room held back by the bands alone."""

    def __init__(self) -> None:
        super().__init__()
        self.core = Scheduler(SchedulerConfig(BANDED), self.aimd, now=0)

    @invariant()
    def poll_never_overfills(self) -> None:
        before = self.core.gate.inflight
        admits = self.core.poll(now=self.now)
        self._take(admits)
        if admits:
            assert self.core.gate.inflight <= self.core.gate.window()
        elif self.core.depth and before < self.core.gate.window():
            assert self.core._next_band() is None  # held back by a ceiling

    @invariant()
    def band_counts_are_true(self) -> None:
        bands = self.core._bands
        assert bands is not None
        by_band = [0, 0]
        for ticket in self.inflight:
            by_band[bands.band(ticket.request.tier)] += 1
        assert bands._inflight == by_band


TestBands = BandsMachine.TestCase
TestBands.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)
