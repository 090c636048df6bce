"""Every benchmark in one run, as a table of ratios against its baseline or goal.

- core: request lifecycles per second through the pure scheduling core (goal 300,000/s);
- sim: simulated requests per second (goal 200,000/s: a day at 1,000 req/s in 8 minutes);
  both also as a ratio of a bare heap event loop timed around them (`bench/baseline.py`);
- gateway: throughput against a bare quart-trio + httpx2 passthrough measured in the same
  run (goal 0.80), and the p50 it adds at half the passthrough's throughput (goal < 1 ms),
  without and with the per-request Redis quota script; and against the same passthrough
  through the gateway's own HTTP client (passthrough-h11), which leaves the gateway's own
  work as the only difference.

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
    parser.add_argument("--seconds", type=float, default=10.0, help="per gateway load phase")
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
    results = gateway.measure(64, args.seconds)
    base = results["passthrough"]
    rows.append(("passthrough req/s", f"{base['rps']:,.0f}", "baseline", 1.0))
    h11 = results["passthrough-h11"]
    rows.append(
        ("passthrough-h11 req/s", f"{h11['rps']:,.0f}", "passthrough", h11["rps"] / base["rps"])
    )
    for name in ("gateway", "gateway+quota"):
        r = results[name]
        rows.append(
            (f"{name} req/s", f"{r['rps']:,.0f}", "passthrough, goal 0.80", r["rps"] / base["rps"])
        )
    for name in ("gateway", "gateway+quota"):
        r = results[name]
        rows.append((f"{name} req/s", f"{r['rps']:,.0f}", "passthrough-h11", r["rps"] / h11["rps"]))
    for name in ("gateway", "gateway+quota"):
        added_ms = (results[name]["half_p50"] - base["half_p50"]) * 1e3
        rows.append(
            (f"{name} added p50 at half load", f"{added_ms:.2f} ms", "goal < 1 ms", added_ms)
        )
    print(f"machine: {machine()}")
    print(f"non-200 answers during the gateway runs: {dict(gateway.FAILURES) or 'none'}")
    print(f"| {'benchmark':<38} | {'measured':>12} | {'against':<24} | {'ratio':>6} |")
    print(f"|{'-' * 40}|{'-' * 14}|{'-' * 26}|{'-' * 8}|")
    for name, measured, against, ratio in rows:
        print(f"| {name:<38} | {measured:>12} | {against:<24} | {ratio:>6.2f} |")


if __name__ == "__main__":
    main()
