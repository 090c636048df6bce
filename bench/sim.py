"""Simulated requests per second of the simulator on the steady scenario (goal: 200,000,
a day at 1,000 requests/s in under 8 minutes).

The shipped `steady` scenario is one hour at 1,000 requests/s across three tiers on twelve
backends (3.6 million requests); this runs its first `--duration` seconds. The same run
times a bare heap-based event loop over as many events as requests simulated
(`bench.baseline`) and prints the rate as a ratio of it, each with its goal; times are the
process's CPU time. Run as `python bench/sim.py [--duration S]`; the last line is the rate.

This file shares its name with the `sim` package, so it takes its own folder off `sys.path`
before importing the package (a script's folder comes first there).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))


from bench.baseline import goal_lines, heap_loop_rate  # noqa: E402
from sim.engine import simulate  # noqa: E402
from sim.scenario import load_scenario  # noqa: E402

GOAL = 200_000.0  # simulated requests per second on the project's 2-core machine


def run(duration_s: float, *, seed: int = 1) -> tuple[int, float]:
    """Simulate the first `duration_s` of the steady scenario: (requests, CPU seconds)."""
    scenario = replace(load_scenario("steady"), duration_s=duration_s)
    started = time.process_time()
    result = simulate(scenario, seed=seed)
    return result.requests, time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=300.0, help="virtual seconds")
    args = parser.parse_args()
    before = heap_loop_rate(round(args.duration * load_scenario("steady").offered_rps))
    requests, cpu_s = run(args.duration)
    rate = requests / cpu_s
    baseline = (before + heap_loop_rate(requests)) / 2  # timed around the run
    print(f"simulated {requests:,} requests ({args.duration:g} s virtual) in {cpu_s:.2f} s of CPU")
    for line in goal_lines("sim", rate, "simulated requests", GOAL, baseline):
        print(line)
    print(f"{rate:,.0f} simulated requests per second")


if __name__ == "__main__":
    main()
