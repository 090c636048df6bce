"""Fail fast in the simulator, on the shipped 3x overload: shed requests are answered at
arrival instead of at their deadline, and goodput does not pay for it (README figures)."""

from __future__ import annotations

import dataclasses

from sim.engine import SimResult, simulate
from sim.scenario import load_scenario


def run(*, fail_fast: bool) -> SimResult:
    scenario = load_scenario("overload_3x")
    tiers = tuple(  # the scenario's Pro and Free fail fast, Enterprise does not
        dataclasses.replace(t, fail_fast=fail_fast and t.name != "enterprise")
        for t in scenario.tiers
    )
    return simulate(dataclasses.replace(scenario, tiers=tiers))


def test_at_3x_overload_pro_and_free_are_answered_at_once_without_losing_goodput() -> None:
    before, after = run(fail_fast=False), run(fail_fast=True)
    for name, max_wait_s in (("pro", 15.0), ("free", 5.0)):
        late, early = before.tier(name), after.tier(name)
        assert late.shed_wait_s.p50 == max_wait_s  # shed at the deadline
        assert early.shed_wait_s.p50 == 0.0  # shed on arrival
        assert early.shed_reasons["predicted_wait"] > early.shed_reasons["deadline"]
    assert after.goodput >= before.goodput
