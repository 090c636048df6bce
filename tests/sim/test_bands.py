"""Priority bands in the simulator (README figures, seed 1): at 3x overload Enterprise keeps
its latency where weights alone let it grow several times over, Pro and Free are shed on
arrival, with spare capacity the lower tiers are held back only as far as the target asks,
and inside a band the weights decide."""

from __future__ import annotations

import dataclasses

import pytest

from sim.engine import SimResult, simulate
from sim.engine.model import Arrivals, Process, Scenario
from sim.scenario import load_scenario


def weights_only(scenario: Scenario) -> Scenario:
    tiers = tuple(dataclasses.replace(t, priority=0, protect_latency_s=0.0) for t in scenario.tiers)
    return dataclasses.replace(scenario, tiers=tiers)


def at_rates(scenario: Scenario, *rates: float) -> Scenario:
    tiers = tuple(
        dataclasses.replace(t, arrivals=Arrivals(Process.POISSON, rate))
        for t, rate in zip(scenario.tiers, rates, strict=True)
    )
    return dataclasses.replace(scenario, tiers=tiers)


def served(result: SimResult, tier: str) -> float:
    t = result.tier(tier)
    return t.completed / t.offered


def test_at_3x_overload_enterprise_keeps_its_latency_and_the_others_are_shed_on_arrival() -> None:
    scenario = load_scenario("overload_3x_bands")
    bands, weights = simulate(scenario), simulate(weights_only(scenario))
    enterprise = bands.tier("enterprise")
    assert served(bands, "enterprise") == 1.0
    assert enterprise.latency_s.p95 < 3.5  # its goal; 3.21 s (2.9 s with the backend to itself)
    assert weights.tier("enterprise").latency_s.p95 > 2 * enterprise.latency_s.p95  # 7.82 s
    for name in ("pro", "free"):
        tier = bands.tier(name)
        assert tier.shed_wait_s.p50 == 0.0  # shed on arrival
        assert tier.shed_reasons["predicted_wait"] > 5 * tier.shed_reasons["deadline"]
        assert tier.goodput > 0  # held back, not starved


def protected_at(scenario: Scenario, target_s: float) -> Scenario:
    tiers = tuple(
        dataclasses.replace(t, protect_latency_s=target_s) if t.protect_latency_s else t
        for t in scenario.tiers
    )
    return dataclasses.replace(scenario, tiers=tiers)


def test_with_spare_capacity_the_lower_bands_are_held_back_only_below_the_target() -> None:
    """Half the capacity: Enterprise's p95 under weights alone is 3.17 s (within its 3.5 s SLO,
    a batch shared with Pro and Free is slower than idle). A target near that leaves the
    weights to decide; the shipped 2.25 s is below it, so Free gives way even here."""
    scenario = at_rates(load_scenario("overload_3x_bands"), 1.3, 1.3, 1.3)
    weights = simulate(weights_only(scenario))
    for name in ("enterprise", "pro", "free"):
        assert served(weights, name) == 1.0
    loose, shipped = simulate(protected_at(scenario, 3.0)), simulate(scenario)
    assert served(loose, "enterprise") == served(loose, "pro") == 1.0
    assert served(loose, "free") >= 0.98  # 388 of 393: a few calls passed 3 s for a moment
    assert served(shipped, "enterprise") == served(shipped, "pro") == 1.0
    assert 0.75 < served(shipped, "free") < 0.9  # 82%: the rest answered from the cache at once
    assert shipped.tier("free").shed_wait_s.p50 == 0.0
    assert shipped.tier("enterprise").latency_s.p95 < loose.tier("enterprise").latency_s.p95


def test_inside_the_lower_band_the_weights_decide() -> None:
    """0.8x the capacity: Enterprise past its SLO under weights alone (4.46 s), so the band
    holds Pro and Free back, and between them Pro's weight 3 against Free's 1 decides."""
    scenario = at_rates(load_scenario("overload_3x_bands"), 2.0, 2.0, 2.0)
    bands, weights = simulate(scenario), simulate(weights_only(scenario))
    assert weights.tier("enterprise").latency_s.p95 > 4.0
    assert bands.tier("enterprise").latency_s.p95 < 3.0
    assert served(bands, "pro") > 0.7 > 0.3 > served(bands, "free")  # 75% and 28%


def test_when_enterprise_alone_fills_the_backend_it_is_still_served() -> None:
    """overload_3x as shipped: Enterprise's third is the backend's whole capacity, so no
    mechanism holds its latency near idle; bands serve all but 1-2% of its requests, where
    weights shed 30% of them at their deadline."""
    shipped = load_scenario("overload_3x")
    tiers = tuple(
        dataclasses.replace(t, priority=1, protect_latency_s=3.0) if t.name == "enterprise" else t
        for t in shipped.tiers
    )
    bands, weights = simulate(dataclasses.replace(shipped, tiers=tiers)), simulate(shipped)
    assert served(bands, "enterprise") > 0.98 > 0.75 > served(weights, "enterprise")


@pytest.mark.parametrize("name", ["holdout_bands_two_pools", "holdout_bands_fast_wide"])
def test_scenarios_not_tuned_on_meet_the_goal(name: str) -> None:
    """Written once, with the target at 1.3x Enterprise's idle p95 as in overload_3x_bands:
    Enterprise within twice its idle p95 (its `slo_latency_s`), all of it served, where
    weights alone let it pass that."""
    scenario = load_scenario(name)
    bands, weights = simulate(scenario), simulate(weights_only(scenario))
    goal_s = scenario.tiers[0].slo_latency_s
    assert served(bands, "enterprise") == 1.0
    assert bands.tier("enterprise").latency_s.p95 <= goal_s
    assert weights.tier("enterprise").latency_s.p95 > goal_s
