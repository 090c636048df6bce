"""Simulated requests per second of the simulator on the steady scenario (goal: 60,000).

The shipped `steady` scenario is one hour at 1,000 requests/s across three tiers on twelve
backends (3.6 million requests); this runs its first `--duration` seconds. Run as
`python bench/sim.py [--duration S]`; the last line is the rate.

This file shares its name with the `sim` package, so it takes its own folder off `sys.path`
before importing the package (a script's folder comes first there).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))


def run(duration_s: float, *, seed: int = 1) -> tuple[int, float]:
    """Simulate the first `duration_s` of the steady scenario: (requests, wall seconds)."""
    from dataclasses import replace

    from sim.engine import simulate
    from sim.scenario import load_scenario

    scenario = replace(load_scenario("steady"), duration_s=duration_s)
    started = time.perf_counter()
    result = simulate(scenario, seed=seed)
    return result.requests, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=300.0, help="virtual seconds")
    args = parser.parse_args()
    requests, wall_s = run(args.duration)
    print(f"simulated {requests:,} requests ({args.duration:g} s virtual) in {wall_s:.2f} s wall")
    print(f"{requests / wall_s:,.0f} simulated requests per second")


if __name__ == "__main__":
    main()
