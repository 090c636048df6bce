"""Priority bands in the simulator (README figures, seed 1): at 3x overload Enterprise keeps
its latency where weights alone let it grow several times over, Pro and Free are shed on
arrival, and with spare capacity the lower tiers are not held back."""

from __future__ import annotations

import dataclasses

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
    assert enterprise.latency_s.p95 < 4.0  # its goal 3.5 s; 2.9 s with the backend to itself
    assert weights.tier("enterprise").latency_s.p95 > 2 * enterprise.latency_s.p95
    for name in ("pro", "free"):
        tier = bands.tier(name)
        assert tier.shed_wait_s.p50 == 0.0  # shed on arrival
        assert tier.shed_reasons["predicted_wait"] > 5 * tier.shed_reasons["deadline"]
        assert tier.goodput > 0  # held back, not starved


def test_with_spare_capacity_the_lower_bands_are_not_held_back() -> None:
    scenario = at_rates(load_scenario("overload_3x_bands"), 1.3, 1.3, 1.3)  # half the capacity
    bands, weights = simulate(scenario), simulate(weights_only(scenario))
    for name in ("enterprise", "pro", "free"):
        assert served(weights, name) == 1.0
    # Enterprise's p95 is 3.1-3.2 s even here, so a few of its calls pass the 3 s target and
    # hold Free back for a moment: 5 of its 393 requests answered from the cache
    assert served(bands, "enterprise") == served(bands, "pro") == 1.0
    assert served(bands, "free") >= 0.98


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
