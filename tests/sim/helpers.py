"""Small scenarios for the simulator's tests: seconds of virtual time, a few hundred requests."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sim.engine.model import Scenario
from sim.scenario import load_scenario, parse_scenario

SHIPPED = Path(__file__).resolve().parents[2] / "sim" / "scenarios"

SMALL = """
name = "small"
duration_s = 40
seed = 3

[backends]
count = 2
max_batch = 8
max_waiting = 16
decode_base_s = 0.01
decode_per_seq_s = 0.002

[fallback]
count = 1
max_batch = 4

[[capacity_events]]
at_s = 15
backends = 1
restore_at_s = 25

[controller]
initial_limit = 16
max_limit = 64
increase_step = 1
cooldown_s = 2.0
target_latency_s = 2.0

[[spikes]]
at_s = 10
duration_s = 10
factor = 3

[[tiers]]
name = "enterprise"
weight = 8
max_wait_s = 10
slo_latency_s = 5
rate_rps = 2
keys = 5
prompt_tokens = { dist = "lognormal", mean = 100, sigma = 0.5, max = 1000 }
output_tokens = { dist = "uniform", min = 10, max = 40 }

[[tiers]]
name = "free"
weight = 1
max_wait_s = 2
max_depth = 20
shed_on_overload = true
slo_latency_s = 8
rate_rps = 8
keys = 50
key_skew = 1.5
cache_hit_ratio = 0.3
prompt_tokens = 50
output_tokens = 20

[tiers.quota]
algorithm = "sliding_counter"
limit = 3
period_s = 1
"""


def small(**changes: object) -> Scenario:
    scenario = parse_scenario(SMALL, source="small.toml")
    return replace(scenario, **changes)  # type: ignore[arg-type]


def shipped(name: str) -> Scenario:
    return load_scenario(SHIPPED / f"{name}.toml")
