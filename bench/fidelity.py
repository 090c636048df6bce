"""Fidelity, full scale: the same scenario in the simulator and live, minutes of real time.

For each controller asked for, simulates the scenario, then replays the very same arrivals in
real time against the gateway (with an embedded Redis) in front of the demo GPU server, all on
loopback, and compares per tier the admitted and shed fractions (goal: within 10 %) and the
p50 and p95 latency (within 15 %). The scenario is `FULL` below unless `--scenario` names a
file; `--controller both` runs it with a fixed window (the pool's batch slots) and then with
its AIMD controller. The last lines are the last run's comparison table; the exit status is 1
if any run failed. Run as `python bench/fidelity.py`; the report of a run is in FIDELITY.md.

This file's folder holds `sim.py` (a name it shares with the `sim` package), so it
takes its own folder off `sys.path` before importing the package (see bench/sim.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

if TYPE_CHECKING:
    from sim.engine.model import Scenario

# One demo GPU (16 at once, about 30 requests/s of this mix) offered 40 requests/s: AIMD
# holds its window around the batch size by latency and pressure, and Free is shed by
# about 40 %, mostly at once while the controller reports congestion.
FULL = """
name = "fidelity_full"
duration_s = 150
seed = 11

[backends]
count = 1
max_batch = 16
max_waiting = 256
decode_base_s = 0.01
decode_per_seq_s = 0.001

[controller]
kind = "aimd"
mode = "window"
initial_limit = 16
min_limit = 2
max_limit = 64
increase_step = 1
decrease_factor = 0.7
target_latency_s = 1.0
pressure_threshold = 0.8
cooldown_s = 2.0
tick_s = 0.25

[[tiers]]
name = "enterprise"
weight = 8
max_wait_s = 10
slo_latency_s = 5
rate_rps = 8
keys = 10
prompt_tokens = { dist = "lognormal", mean = 300, sigma = 0.6, max = 3000 }
output_tokens = { dist = "lognormal", mean = 20, sigma = 0.4, max = 80 }

[[tiers]]
name = "pro"
weight = 3
max_wait_s = 4
slo_latency_s = 6
rate_rps = 8
keys = 20
prompt_tokens = { dist = "lognormal", mean = 300, sigma = 0.6, max = 3000 }
output_tokens = { dist = "lognormal", mean = 20, sigma = 0.4, max = 80 }

[[tiers]]
name = "free"
weight = 1
max_wait_s = 2
shed_on_overload = true
slo_latency_s = 8
rate_rps = 24
keys = 40
key_skew = 1.2
prompt_tokens = { dist = "lognormal", mean = 300, sigma = 0.6, max = 3000 }
output_tokens = { dist = "lognormal", mean = 20, sigma = 0.4, max = 80 }
"""


def variants(name: str, duration_s: float | None, which: str) -> list[Scenario]:
    """The scenario once per controller asked for: fixed (the pool's slots), its own AIMD."""
    from dataclasses import replace

    from scheduler.core import GateMode
    from sim.engine.controllers import pool_slots
    from sim.engine.model import ControllerKind
    from sim.scenario import load_scenario, parse_scenario

    full = parse_scenario(FULL, source="fidelity_full.toml")
    scenario = load_scenario(name) if name else full
    if duration_s is not None:
        scenario = replace(scenario, duration_s=duration_s)
    fixed = replace(
        scenario.controller,
        kind=ControllerKind.FIXED,
        mode=GateMode.WINDOW,
        fixed_limit=float(pool_slots(scenario.backends)),
    )
    runs: list[Scenario] = []
    if which in ("fixed", "both"):
        runs.append(replace(scenario, controller=fixed))
    if which in ("aimd", "both"):
        runs.append(scenario)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="", help="a scenario file (default: FULL above)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of each run")
    parser.add_argument("--controller", choices=("fixed", "aimd", "both"), default="both")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()

    import trio

    from backends.redis.embedded import EmbeddedRedis
    from bench.fidelity_rig import run_fidelity

    failed = False
    with EmbeddedRedis() as redis:
        for scenario in variants(args.scenario, args.duration, args.controller):
            started = time.monotonic()
            fidelity = trio.run(
                partial(run_fidelity, scenario, seed=args.seed, redis_url=redis.url)
            )
            load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"\nwall {time.monotonic() - started:.0f} s, load average {load}")
            print(fidelity.report(), flush=True)
            failed = failed or not fidelity.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
