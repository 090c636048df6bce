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
    d = Dispatcher(core, tick_s=lambda: 0.25, pressure=lambda: (0.0, trio.current_time()))
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


class SeeingController(FixedController):
    """A fixed limit that writes down the in-flight credit each tick is given."""

    def __init__(self, limit: float) -> None:
        super().__init__(limit)
        self.unseen: list[int] = []

    def tick(
        self, *, now: float, utilization: float, pressure: float, inflight: int = 0, unseen: int = 0
    ) -> float:
        self.unseen.append(unseen)
        return super().tick(now=now, utilization=utilization, pressure=pressure)


async def test_the_tick_credits_what_was_dispatched_since_the_scrape(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    controller = SeeingController(10)
    core = Scheduler(SchedulerConfig(TIERS), controller, now=trio.current_time())
    scraped_at = [trio.current_time()]
    d = Dispatcher(core, tick_s=lambda: 0.25, pressure=lambda: (0.0, scraped_at[0]))
    await nursery.start(d.run)
    await trio.sleep(0.1)
    admits = [await d.wait_decision(d.submit(request("gold"))) for _ in range(3)]
    await trio.sleep(0.2)  # the tick at 0.25 s: the scrape from 0 s saw none of the three
    assert controller.unseen == [3]
    scraped_at[0] = trio.current_time()  # a scrape taken with the three in flight
    await trio.sleep(0.25)
    assert controller.unseen == [3, 0]
    for admit in admits:
        assert isinstance(admit, Admit)
        d.finish(admit.ticket, Sample(0.1))
    await trio.sleep(0.25)  # in flight went down since the scrape: nothing unseen
    assert controller.unseen == [3, 0, 0]
