"""The dispatcher task in virtual time (trio's MockClock): admission, expiry, cancel."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from scheduler.core import (
    Admit,
    FixedController,
    Request,
    Sample,
    Scheduler,
    SchedulerConfig,
    Shed,
    ShedReason,
    TierConfig,
)
from scheduler.service.dispatcher import Dispatcher

ids = itertools.count()
TIERS = (
    TierConfig("gold", 4, max_wait_s=10, max_depth=100),
    TierConfig("free", 1, max_wait_s=2, max_depth=100),
)


def request(tier: str) -> Request:
    return Request(next(ids), "t", tier, "k", "m", 1.0, trio.current_time())


@pytest.fixture
async def dispatcher(nursery: trio.Nursery) -> Dispatcher:
    core = Scheduler(SchedulerConfig(TIERS), FixedController(1), now=trio.current_time())
    d = Dispatcher(core, tick_s=lambda: 0.25, pressure=lambda: 0.0)
    await nursery.start(d.run)
    return d


async def test_expiry_happens_at_the_deadline_in_virtual_time(
    dispatcher: Dispatcher, autojump_clock: trio.testing.MockClock
) -> None:
    first = await dispatcher.wait_decision(dispatcher.submit(request("gold")))
    assert isinstance(first, Admit)
    start = trio.current_time()
    shed = await dispatcher.wait_decision(dispatcher.submit(request("free")))
    assert isinstance(shed, Shed) and shed.reason is ShedReason.DEADLINE
    assert trio.current_time() - start == pytest.approx(2.0, abs=1e-6)


async def test_finish_admits_the_next_in_fair_order(
    dispatcher: Dispatcher, autojump_clock: trio.testing.MockClock
) -> None:
    first = await dispatcher.wait_decision(dispatcher.submit(request("free")))
    assert isinstance(first, Admit)
    free = dispatcher.submit(request("free"))
    gold = dispatcher.submit(request("gold"))
    await trio.sleep(0.5)
    assert free.decision is None and gold.decision is None  # queued
    dispatcher.finish(first.ticket, Sample(0.5))
    decision = await dispatcher.wait_decision(gold)
    assert isinstance(decision, Admit)
    assert free.decision is None


async def test_a_cancelled_wait_gives_the_seat_back(
    dispatcher: Dispatcher, autojump_clock: trio.testing.MockClock
) -> None:
    first = await dispatcher.wait_decision(dispatcher.submit(request("gold")))
    assert isinstance(first, Admit)
    with trio.move_on_after(1):
        await dispatcher.wait_decision(dispatcher.submit(request("gold")))
    await trio.sleep(0.01)
    assert dispatcher.core.depth == 0
    dispatcher.finish(first.ticket, Sample(0.1))
    later = await dispatcher.wait_decision(dispatcher.submit(request("gold")))
    assert isinstance(later, Admit)
    await trio.sleep(0.01)
    assert dispatcher.core.gate.inflight == 1
