"""Fail fast: an arrival whose predicted queue wait passes its deadline is shed at once."""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core import (
    Admit,
    FixedController,
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
from scheduler.core.wait import WaitPredictor
from scheduler.core.wfq import Backlog, Entry

ids = itertools.count()


def req(tier: str, now: float, key: str = "k", cost: float = 1.0) -> Request:
    return Request(next(ids), "t", tier, key, "m", cost, now)


def tiers(*, fail_fast: bool = True) -> tuple[TierConfig, ...]:
    return (
        TierConfig("gold", 3, max_wait_s=30, max_depth=1000, fail_fast=fail_fast),
        TierConfig("free", 1, max_wait_s=2, max_depth=1000, fail_fast=fail_fast),
    )


def backlogged(core: Scheduler, tier: str, *, per_tick: int, ticks: int, depth: int) -> float:
    """Keep `tier` backlogged by key "bulk" at `depth` while `per_tick` calls of 0.5 s end
    every 0.25 s tick (the window of 4 drains 8 a second); the time at the end, when
    `depth - per_tick` are queued."""
    admitted: list[Admit] = []
    now = 0.0
    for _ in range(ticks):
        while core.depth < depth:
            decision = core.submit(req(tier, now, key="bulk"), now=now)
            if isinstance(decision, Admit):
                admitted.append(decision)
        for admit in admitted[:per_tick]:
            core.finish(admit.ticket, Sample(0.5))
        admitted = admitted[per_tick:] + core.poll(now=now)
        now += 0.25
        core.tick(now=now)
    return now


def test_an_arrival_that_would_wait_past_its_deadline_is_shed_at_once() -> None:
    core = Scheduler(SchedulerConfig(tiers()), FixedController(4), now=0)
    now = backlogged(core, "free", per_tick=2, ticks=20, depth=12)  # 8 a second, 10 queued
    assert core.predict_wait_s(req("free", now, key="bulk"), now=now) == 10 / 8
    for _ in range(7):  # 10 to 16 ahead at 8 a second: within the 2 s Free may wait
        assert isinstance(core.submit(req("free", now, key="bulk"), now=now), Queued)
    shed = core.submit(req("free", now, key="bulk"), now=now)
    assert isinstance(shed, Shed) and shed.reason is ShedReason.PREDICTED_WAIT
    assert shed.queued_s == 0 and shed.predicted_wait_s == 17 / 8
    counts = {t.name: t for t in core.statistics().tiers}["free"]
    assert counts.shed["predicted_wait"] == 1


def test_a_tier_that_does_not_fail_fast_waits_for_its_deadline() -> None:
    core = Scheduler(SchedulerConfig(tiers(fail_fast=False)), FixedController(4), now=0)
    now = backlogged(core, "free", per_tick=2, ticks=20, depth=12)
    assert core.predict_wait_s(req("free", now), now=now) > 0  # predicted, but not acted on
    decisions = [core.submit(req("free", now, key="bulk"), now=now) for _ in range(40)]
    assert all(isinstance(d, Queued) for d in decisions)


def test_nothing_is_predicted_before_a_call_has_ended() -> None:
    core = Scheduler(SchedulerConfig(tiers()), FixedController(4), now=0)
    decisions = [core.submit(req("free", 0.0), now=0.0) for _ in range(200)]
    assert sum(isinstance(d, Admit) for d in decisions) == 4
    assert all(isinstance(d, Queued) for d in decisions[4:])


def test_a_burst_after_an_idle_spell_is_predicted_at_the_gates_pace() -> None:
    """The calls before the burst were few (the demand), but each held its slot 0.5 s: the
    window of 4 drains 8 a second, so 16 wait (2 s) and the rest are shed at once."""
    core = Scheduler(SchedulerConfig(tiers()), FixedController(4), now=0)
    for at in range(10):  # one call a second, of 0.5 s
        admit = core.submit(req("free", at), now=at)
        assert isinstance(admit, Admit)
        core.finish(admit.ticket, Sample(0.5))
        core.tick(now=at + 0.5)
    decisions = [core.submit(req("free", 10.0), now=10.0) for _ in range(40)]
    kinds = [type(d).__name__ for d in decisions]
    assert kinds == ["Admit"] * 4 + ["Queued"] * 17 + ["Shed"] * 19


def test_a_light_key_is_not_shed_for_a_noisy_neighbours_backlog() -> None:
    core = Scheduler(SchedulerConfig(tiers()), FixedController(4), now=0)
    now = backlogged(core, "free", per_tick=2, ticks=20, depth=12)
    for _ in range(40):  # one key floods the tier far past what 2 s can serve
        core.submit(req("free", now, key="bulk"), now=now)
    assert core.predict_wait_s(req("free", now, key="bulk"), now=now) > 2.0
    light = core.submit(req("free", now, key="light"), now=now)
    assert isinstance(light, Queued)  # keys share equally: it goes ahead of the flood


def test_a_tier_is_predicted_at_least_its_weighted_share() -> None:
    """Gold arrives into Free's backlog: it is owed 3/4 of the rate at once, before its own
    share was ever measured."""
    core = Scheduler(SchedulerConfig(tiers()), FixedController(4), now=0)
    now = backlogged(core, "free", per_tick=2, ticks=20, depth=12)
    for _ in range(11):
        core.submit(req("gold", now), now=now)
    assert core.predict_wait_s(req("gold", now), now=now) == pytest.approx(11 / (8 * 3 / 4))


def test_the_drain_rate_is_the_gates_pace_times_the_mean_cost() -> None:
    predictor = WaitPredictor(["a"], now=0.0)
    assert math.isnan(predictor.drain_rate(slots_per_s=None, window=10, now=0.0))
    predictor.observe_call(2.0, 100.0)
    assert predictor.drain_rate(slots_per_s=None, window=10, now=0.0) == 500.0  # 10 slots / 2 s
    assert (
        predictor.drain_rate(slots_per_s=3.0, window=10, now=0.0) == 300.0
    )  # rate mode: the limit
    for _ in range(500):
        predictor.observe_call(1.0, 50.0)
    assert predictor.drain_rate(slots_per_s=None, window=10, now=0.0) == pytest.approx(
        500.0, rel=1e-3
    )


def test_a_tiers_measured_share_counts_while_backlogged_and_fresh() -> None:
    predictor = WaitPredictor(["a", "b"], now=0.0)
    backlog = Backlog(tier_cost=40.0, key_cost=40.0, keys=1)
    wait = partial(predictor.predict_wait_s, "a", backlog, 1.0, share=0.25, drain_rate=40.0)
    predictor.observe_tick(now=1.0, admitted={"a": 0.0, "b": 0.0}, depths={"a": 5, "b": 5})
    predictor.observe_tick(now=2.0, admitted={"a": 30.0, "b": 10.0}, depths={"a": 5, "b": 5})
    assert wait(now=2.0) == 40 / (40 * 0.75)  # b left a more than its weight gives it
    predictor.observe_tick(now=3.0, admitted={"a": 31.0, "b": 20.0}, depths={"a": 0, "b": 5})
    assert wait(now=3.0) == 40 / (40 * 0.75)  # an empty queue shows the demand: not counted
    assert wait(now=8.0) == 40 / (40 * 0.25)  # stale: back to its weight's share


@settings(max_examples=50, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["push", "pop", "cancel", "expire"]),
            st.sampled_from(["a", "b", "c"]),
            st.integers(1, 50),
        ),
        max_size=80,
    )
)
def test_the_backlog_is_what_is_still_queued(ops: list[tuple[str, str, int]]) -> None:
    queue = WeightedFairQueue([TierConfig("t", 1, max_wait_s=5, max_depth=1000)])
    live: list[Entry] = []
    now = 0.0
    for op, key, cost in ops:
        now += 0.5
        if op == "push":
            entry = queue.push(req("t", now, key=key, cost=float(cost)), now=now)
            assert entry is not None
            live.append(entry)
        elif op == "pop":
            queue.pop()
        elif op == "cancel" and live:
            queue.cancel(live[cost % len(live)])
        elif op == "expire":
            queue.expire(now=now)
        live = [e for e in live if e.state.value == "queued"]
        total = sum(e.request.cost for e in live)
        for k in ("a", "b", "c", "new"):
            backlog = queue.backlog("t", k)
            assert backlog.tier_cost == pytest.approx(total)
            own = sum(e.request.cost for e in live if e.request.key_id == k)
            assert backlog.key_cost == pytest.approx(own)
            assert backlog.keys >= len({e.request.key_id for e in live} | {k})
