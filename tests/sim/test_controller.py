"""The controller in the simulator: slow start reaches a large pool within seconds, the
backends stay busy while there is demand, a stale scrape is credited, and replicas share the
backends evenly without exceeding them together."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from sim.engine import simulate
from sim.engine.controllers import pool_slots
from sim.engine.model import Scenario
from sim.engine.results import jain_index
from sim.scenario import ScenarioError, parse_scenario

# 256 slots; a request takes ~0.5 s at a full batch, so the pool serves ~500 rps; 700 offered.
BUSY = """
name = "busy"
duration_s = 20
seed = 5
scrape_age_s = 0.05

[backends]
count = 8
max_batch = 32
kv_capacity_tokens = 262144
max_waiting = 256
decode_base_s = 0.01
decode_per_seq_s = 0.0005

[controller]
initial_limit = 16
min_limit = 4
max_limit = 2048
increase_step = 2
decrease_factor = 0.9
target_latency_s = 2.0
latency_percentile = 0.5
cooldown_s = 2.0

[[tiers]]
name = "pro"
weight = 1
max_wait_s = 5
slo_latency_s = 6
rate_rps = 700
keys = 100
prompt_tokens = { dist = "uniform", min = 50, max = 150 }
output_tokens = { dist = "uniform", min = 15, max = 25 }
"""


def busy(**changes: object) -> Scenario:
    return replace(parse_scenario(BUSY), **changes)  # type: ignore[arg-type]


def knee(scenario: Scenario) -> float:
    """In-flight at which the pool reads as congested: its slots, plus the waiting that the
    pressure threshold lets through (a full batch waiting on each backend reads as 1.0)."""
    return pool_slots(scenario.backends) * (1 + scenario.controller.aimd.pressure_threshold)


def test_slow_start_reaches_the_pool_in_seconds_where_steps_take_a_minute() -> None:
    scenario = busy()
    slots = pool_slots(scenario.backends)
    series = simulate(scenario).series
    reached = next(t for t, limit in zip(series.t, series.limit, strict=True) if limit >= slots)
    assert reached <= 3.0
    plain = replace(scenario.controller.aimd, slow_start_growth=1.0)
    stepped = simulate(scenario, controller=replace(scenario.controller, aimd=plain)).series
    assert stepped.limit[2] < slots / 4  # at 3 s: 16 + 2 a tick = 40


@pytest.mark.parametrize("scrape_age_s", [0.0, 0.05, 0.2])
def test_the_backends_stay_busy_while_requests_wait(scrape_age_s: float) -> None:
    result = simulate(busy(scrape_age_s=scrape_age_s))
    assert result.utilization >= 0.9
    assert sum(t.dropped for t in result.tiers) == 0  # the backends' waiting rooms held


def test_three_replicas_share_the_pool_evenly_and_within_it() -> None:
    scenario = busy(replicas=3, duration_s=30)
    result = simulate(scenario)
    limits = result.replica_limits
    assert len(limits) == 3
    assert jain_index(list(limits)) >= 0.9
    series = result.series
    settled = [x for t, x in zip(series.t, series.inflight, strict=True) if t >= 10]
    assert max(settled) <= 1.05 * knee(scenario)
    assert sum(limits) <= 1.05 * knee(scenario)
    assert result.utilization >= 0.9
    alone = simulate(busy(duration_s=30))
    assert sum(limits) == pytest.approx(alone.replica_limits[0], rel=0.15)  # the same pool


def test_replicas_and_scrape_age_are_checked() -> None:
    with pytest.raises(ScenarioError, match="replicas"):
        parse_scenario(BUSY.replace("seed = 5", "seed = 5\nreplicas = 0"))
    with pytest.raises(ScenarioError, match="scrape_age_s"):
        parse_scenario(BUSY.replace("scrape_age_s = 0.05", "scrape_age_s = 0.25"))
    assert math.isnan(simulate(busy(duration_s=2, tiers=(idle(),))).utilization)


def idle() -> object:
    tier = parse_scenario(BUSY).tiers[0]
    return replace(tier, arrivals=replace(tier.arrivals, rate_rps=1.0))
