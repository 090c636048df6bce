"""The control loop against a real engine: ~3x llama-server's capacity, AIMD vs a fixed window.

Starts llama-server (as bench/fidelity_llama.py does: `--parallel 4`, one thread), calibrates
the simulator on it to learn its capacity for this workload, then offers `--load` times that
capacity (three tiers, 10/20/70 %, Free shed on overload) through the gateway for `--duration`
seconds, the same arrivals once with a fixed window of the engine's slots and once with AIMD.
Per tier: offered, admitted, shed, goodput within the tier's SLO (as a fraction of offered and
per second), p50/p95; and the controller's limit (mean over the run and its last half).

    python bench/closed_loop_llama.py [--duration 60] [--load 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import trio  # noqa: E402

from backends.redis.embedded import EmbeddedRedis  # noqa: E402
from bench.fidelity_live import LiveRun, run_live  # noqa: E402
from bench.fidelity_llama import OUTPUT_MEAN, scenario_text  # noqa: E402
from bench.fidelity_schedule import arrival_schedule  # noqa: E402
from scheduler.calibrate import Bounds, calibrate  # noqa: E402
from sim.engine.model import Scenario  # noqa: E402
from sim.engine.results import Percentiles  # noqa: E402
from sim.report import format_table  # noqa: E402
from sim.scenario import parse_scenario  # noqa: E402
from tests.support.llama_server import (  # noqa: E402
    MODEL_ALIAS,
    LlamaServer,
    ServerOptions,
    ensure_llama_server,
    ensure_model,
)

# Enterprise at 0.3x the capacity, Pro 0.6x, Free 2.1x: the engine can hold Enterprise alone
SHARES = (0.1, 0.2, 0.7)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summary(scenario: Scenario, run: LiveRun) -> str:
    schedule = arrival_schedule(scenario)
    rows = []
    total_good = 0
    for tier in scenario.tiers:
        mine = [o for a, o in zip(schedule, run.outcomes, strict=True) if a.tier == tier.name]
        ok = [o.latency_s for o in mine if o.status == 200]
        good = sum(latency <= tier.slo_latency_s for latency in ok)
        total_good += good
        shed = sum(o.status == 503 for o in mine)
        pct = Percentiles.of(ok)
        rows.append(
            (
                tier.name,
                len(mine),
                len(ok),
                shed,
                f"{good / len(mine):.3f}" if mine else "-",
                f"{good / scenario.duration_s:.2f}",
                f"{pct.p50:.3f}",
                f"{pct.p95:.3f}",
                f"{tier.slo_latency_s:g}",
            )
        )
    limits = [limit for _, limit in run.limits]
    late = limits[len(limits) // 2 :]
    table = format_table(
        ("tier", "offered", "200", "503", "good/off", "good/s", "p50 s", "p95 s", "slo s"), rows
    )
    return (
        f"{table}\ngoodput within SLO: {total_good / scenario.duration_s:.2f} requests/s; "
        f"limit mean {sum(limits) / len(limits):.1f}, last half {sum(late) / len(late):.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--load", type=float, default=3.0, help="offered / fitted capacity")
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()
    build = ensure_llama_server(log=_log)
    options = ServerOptions(parallel=args.parallel, ctx_size=args.parallel * 2048, threads=1)
    with LlamaServer(build, ensure_model(build), options) as server, EmbeddedRedis() as redis:
        bounds = Bounds(prompts=(48, 192), output_tokens=OUTPUT_MEAN, max_concurrency=16)
        fit = trio.run(calibrate, server.url, MODEL_ALIAS, bounds, _log)
        print(f"fit: {fit.gpu} (mean error {100 * fit.mean_error:.1f}%)")
        for controller in ("fixed", "aimd"):
            text = scenario_text(
                fit, duration_s=args.duration, load=args.load, controller=controller, shares=SHARES
            )
            scenario = parse_scenario(text, source=f"closed_loop_{controller}.toml")
            schedule = arrival_schedule(scenario)
            started = time.monotonic()
            live = trio.run(
                partial(
                    run_live, scenario, schedule, redis_url=redis.url, backend_urls=[server.url]
                )
            )
            load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
            print(
                f"\n{scenario.controller.label}, offered {len(schedule) / args.duration:.1f} "
                f"requests/s ({args.load:g}x the fitted capacity), wall "
                f"{time.monotonic() - started:.0f} s, load average {load}"
            )
            print(summary(scenario, live), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
