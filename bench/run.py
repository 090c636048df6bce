"""Every benchmark in one run, as a table of ratios against its baseline or goal.

- core: request lifecycles per second through the pure scheduling core (goal 300,000/s);
- sim: simulated requests per second (goal 200,000/s: a day at 1,000 req/s in 8 minutes);
  both also as a ratio of a bare heap event loop timed around them (`bench/baseline.py`);
- gateway: the goals of bench/gateway.py (issue #16), against a bare hypercorn + h11 proxy
  measured in the same run: throughput and CPU per request with the Redis quota at c=32
  and c=128, the latency added at half load, and, with `--workers 2`, 500 clients of a
  500 ms backend and 2,000 SSE streams; and no non-2xx answer in any of those runs.

Run as `python bench/run.py [--seconds S]`; the table is printed last.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench import core, gateway  # noqa: E402
from bench import sim as sim_bench  # noqa: E402
from bench.baseline import REFERENCE_EVENTS_PER_S, heap_loop_rate  # noqa: E402


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=6.0, help="each closed/half gateway run")
    args = parser.parse_args()
    rows: list[tuple[str, str, str, float]] = []
    before = heap_loop_rate(300_000)
    rate = core.run(300_000)
    requests, cpu_s = sim_bench.run(300.0)
    sim_rate = requests / cpu_s
    baseline = (before + heap_loop_rate(300_000)) / 2
    for label, pure_rate, goal in (
        ("core lifecycles/s", rate, core.GOAL),
        ("sim requests/s", sim_rate, sim_bench.GOAL),
    ):
        rows.append((label, f"{pure_rate:,.0f}", f"goal {goal:,.0f}", pure_rate / goal))
        of_loop, goal_of_loop = pure_rate / baseline, goal / REFERENCE_EVENTS_PER_S
        rows.append(
            (
                f"{label} / heap loop",
                f"{of_loop:.4f}",
                f"goal {goal_of_loop:.4f}",
                of_loop / goal_of_loop,
            )
        )
    goals = gateway.measure(gateway.parse(["--seconds", str(args.seconds)]))
    print(f"machine: {machine()}")
    rows += [(g.name + " *" * g.busy, g.measured, g.against, g.ratio) for g in goals]
    print(f"| {'benchmark':<42} | {'measured':>12} | {'against':<26} | {'ratio':>7} |")
    print(f"|{'-' * 44}|{'-' * 14}|{'-' * 28}|{'-' * 9}|")
    for name, measured, against, ratio in rows:
        print(f"| {name:<42} | {measured:>12} | {against:<26} | {ratio:>7.2f} |")
    if any(g.busy for g in goals):
        print(f"* other programs took over {gateway.BUSY_CORES} cores during a run it reads")


if __name__ == "__main__":
    main()
