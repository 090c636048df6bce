"""Controllers against a synthetic backend whose latency rises past its capacity C."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from scheduler.core import (
    AIMDConfig,
    AIMDController,
    FixedController,
    GradientConfig,
    GradientController,
    LatencySignal,
    Outcome,
    Sample,
    credited_growth,
)

BASE_S = 1.0


def latency_at(inflight: float, capacity: float) -> float:
    """A backend that serves up to `capacity` at once at BASE_S, then slows in proportion."""
    return BASE_S * max(1.0, inflight / capacity)


def drive(controller: AIMDController, capacity: float, ticks: int, start: float) -> list[float]:
    """Saturating load: the window is always full, so the samples show latency at the limit."""
    limits = []
    tick_s = controller.config.tick_s
    for n in range(ticks):
        inflight = math.floor(controller.limit)
        for _ in range(5):
            controller.record(Sample(latency_at(inflight, capacity)))
        limits.append(controller.tick(now=start + n * tick_s, utilization=1.0, pressure=0.0))
    return limits


def test_aimd_settles_near_capacity_and_follows_it() -> None:
    config = AIMDConfig(
        initial_limit=16,
        target_latency_s=1.1 * BASE_S,
        decrease_factor=0.9,
        increase_step=1,
        cooldown_s=1.0,
    )
    aimd = AIMDController(config)
    limits = drive(aimd, 100, 400, start=0)
    assert all(85 <= x <= 115 for x in limits[-200:])
    limits = drive(aimd, 50, 200, start=100)  # capacity halves
    assert limits[40] < 60
    assert all(42.5 <= x <= 57.5 for x in limits[-100:])
    limits = drive(aimd, 100, 300, start=200)  # and comes back
    assert all(85 <= x <= 115 for x in limits[-100:])


def test_aimd_backs_off_on_pressure_and_drops() -> None:
    aimd = AIMDController(AIMDConfig(initial_limit=50, cooldown_s=0))
    aimd.record(Sample(0.1))
    assert aimd.tick(now=0, utilization=1, pressure=0.95) == pytest.approx(35)
    assert aimd.congested
    aimd.record(Sample(0.1, Outcome.DROPPED))
    assert aimd.tick(now=1, utilization=1, pressure=0.1) == pytest.approx(24.5)
    aimd.record(Sample(0.1))
    assert aimd.tick(now=2, utilization=1, pressure=0.1) == pytest.approx(25.5)
    assert not aimd.congested


def test_aimd_app_limited_guard_holds_an_unused_limit() -> None:
    aimd = AIMDController(AIMDConfig(initial_limit=50, slow_start_growth=1))
    for n in range(20):
        aimd.record(Sample(0.1))
        aimd.tick(now=n, utilization=0.3, pressure=0.0)
    assert aimd.limit == 50
    aimd.tick(now=21, utilization=0.5, pressure=0.0)
    assert aimd.limit == 51


def test_slow_start_reaches_a_large_capacity_in_seconds() -> None:
    aimd = AIMDController(AIMDConfig(initial_limit=16, target_latency_s=1.1 * BASE_S))
    limits = drive(aimd, 250, 12, start=0)  # 3 s of 0.25 s ticks
    assert max(limits) >= 250
    assert not aimd.slow_start  # it met the capacity and left slow start
    plain = AIMDController(AIMDConfig(initial_limit=16, slow_start_growth=1))
    assert max(drive(plain, 250, 12, start=0)) == 28  # one step a tick


def test_slow_start_exits_on_the_first_congestion_signal() -> None:
    for congest in (
        lambda c: c.record(Sample(9.0)),  # latency over target
        lambda c: c.record(Sample(0.1, Outcome.DROPPED)),
        None,  # pressure over threshold (below)
    ):
        config = AIMDConfig(initial_limit=16, slow_start_growth=2, target_latency_s=5, cooldown_s=0)
        aimd = AIMDController(config)
        for n in range(3):
            aimd.record(Sample(0.1))
            aimd.tick(now=n, utilization=1, pressure=0.0, inflight=int(aimd.limit))
        assert aimd.limit == 128 and aimd.slow_start
        if congest is not None:
            congest(aimd)
        aimd.tick(now=3, utilization=1, pressure=0.0 if congest else 0.9, inflight=128)
        assert aimd.limit == pytest.approx(128 * 0.7)
        assert not aimd.slow_start
        aimd.record(Sample(0.1))
        aimd.tick(now=4, utilization=1, pressure=0.0, inflight=89)
        assert aimd.limit == pytest.approx(128 * 0.7 + 1)  # additive from now on


def test_in_flight_credit_grows_only_on_what_the_scrape_has_seen() -> None:
    assert credited_growth(2.0, inflight=100, unseen=0) == 2.0
    assert credited_growth(2.0, inflight=100, unseen=50) == 1.5
    assert credited_growth(2.0, inflight=100, unseen=100) == 1.0
    assert credited_growth(3.0, inflight=100, unseen=250) == 1.0  # more unseen than in flight
    assert credited_growth(2.0, inflight=0, unseen=0) == 2.0  # nothing in flight to discount

    def after(unseen: int) -> float:
        aimd = AIMDController(AIMDConfig(initial_limit=100, increase_step=2, slow_start_growth=2))
        aimd.record(Sample(0.1))
        return aimd.tick(now=0, utilization=1, pressure=0.0, inflight=100, unseen=unseen)

    assert after(0) == 200
    assert after(75) == 125
    assert after(100) == 102  # nothing seen: the additive step, never less


def test_slow_start_can_be_turned_off_live() -> None:
    aimd = AIMDController(AIMDConfig(initial_limit=16))
    aimd.configure(replace(aimd.config, slow_start_growth=1.0))
    assert not aimd.slow_start
    aimd.record(Sample(0.1))
    assert aimd.tick(now=0, utilization=1, pressure=0.0, inflight=16) == 17
    aimd.configure(
        replace(aimd.config, slow_start_growth=2.0)
    )  # once left, slow start is not entered again
    assert not aimd.slow_start
    with pytest.raises(ValueError, match="slow_start_growth"):
        aimd.configure(replace(aimd.config, slow_start_growth=0.5))


def test_aimd_cooldown_guard_allows_one_cut_per_cooldown() -> None:
    aimd = AIMDController(AIMDConfig(initial_limit=100, cooldown_s=1.0, decrease_factor=0.5))
    for now in (0.0, 0.25, 0.5, 0.75):
        aimd.record(Sample(100.0))
        aimd.tick(now=now, utilization=1, pressure=0)
    assert aimd.limit == 50
    aimd.record(Sample(100.0))
    aimd.tick(now=1.0, utilization=1, pressure=0)
    assert aimd.limit == 25


def test_aimd_bounds_guard() -> None:
    aimd = AIMDController(AIMDConfig(initial_limit=4, min_limit=2, max_limit=5, cooldown_s=0))
    for n in range(10):
        aimd.tick(now=n, utilization=1, pressure=0.99)
    assert aimd.limit == 2
    for n in range(10, 30):
        aimd.record(Sample(0.01))
        aimd.tick(now=n, utilization=1, pressure=0)
    assert aimd.limit == 5


def test_aimd_gains_change_live_and_are_validated() -> None:
    aimd = AIMDController(AIMDConfig(initial_limit=100))
    aimd.configure(replace(aimd.config, max_limit=40, initial_limit=20))
    assert aimd.limit == 40
    with pytest.raises(ValueError, match=r"controller\.decrease_factor"):
        aimd.configure(replace(aimd.config, decrease_factor=1.5))
    assert aimd.config.decrease_factor == 0.7  # a refused change leaves the old gains
    with pytest.raises(ValueError, match=r"controller\.min_limit"):
        AIMDConfig(min_limit=0)


def test_latency_signals() -> None:
    sample = Sample(latency_s=2.0, ttft_s=0.5, output_tokens=16)
    assert sample.signal(LatencySignal.LATENCY) == 2.0
    assert sample.signal(LatencySignal.TTFT) == 0.5
    assert sample.signal(LatencySignal.TPOT) == pytest.approx(0.1)
    assert Sample(latency_s=2.0).signal(LatencySignal.TTFT) == 2.0


def test_gradient_shrinks_when_latency_rises_and_grows_when_flat() -> None:
    grad = GradientController(GradientConfig(initial_limit=50))
    for n in range(20):
        grad.record(Sample(1.0))
        grad.tick(now=n, utilization=1, pressure=0)
    grown = grad.limit
    assert grown > 50
    for n in range(20, 30):
        grad.record(Sample(4.0))
        grad.tick(now=n, utilization=1, pressure=0)
    assert grad.limit < grown
    assert grad.congested
    before = grad.limit
    grad.tick(now=31, utilization=1, pressure=0.99)
    assert grad.limit < before


def test_fixed_controller_is_fixed() -> None:
    fixed = FixedController(8)
    fixed.record(Sample(100.0, Outcome.DROPPED))
    assert fixed.tick(now=0, utilization=1, pressure=1) == 8
    with pytest.raises(ValueError, match=r"controller\.limit"):
        FixedController(0)


def test_replicas_over_one_backend_converge_to_even_shares_within_its_knee() -> None:
    """Three AIMD controllers from very different limits, one backend: C slots, then a
    waiting room whose fill is the pressure (C waiting reads as 1.0). Like TCP flows they end
    near even, their sum at the knee the pressure threshold sets."""
    capacity = 300.0
    config = AIMDConfig(initial_limit=16, increase_step=2, decrease_factor=0.9, max_limit=2000)
    replicas = [AIMDController(replace(config, initial_limit=x)) for x in (16, 200, 600)]
    sums = []
    for n in range(800):
        inflight = [math.floor(c.limit) for c in replicas]
        pressure = min(1.0, max(0.0, sum(inflight) - capacity) / capacity)
        for c, mine in zip(replicas, inflight, strict=True):
            c.record(Sample(latency_at(min(sum(inflight), capacity), capacity)))
            c.tick(now=n * 0.25, utilization=1.0, pressure=pressure, inflight=mine)
        sums.append(sum(c.limit for c in replicas))
    limits = [c.limit for c in replicas]
    assert sum(limits) ** 2 / (len(limits) * sum(x * x for x in limits)) >= 0.9
    knee = capacity * (1 + config.pressure_threshold)
    assert all(0.8 * knee <= total <= 1.05 * knee for total in sums[-400:])
