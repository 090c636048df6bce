"""Fidelity against a real engine: calibrate on llama-server, then simulate and replay live.

Starts llama.cpp's `llama-server` (tests/support/llama_server.py: the pinned build, the
random-weight model) with `--parallel` slots, profiles it with `scheduler calibrate`'s bursts
(`scheduler.calibrate`), and builds a different workload from the fit: three tiers of Poisson
arrivals with lognormal sizes, offered `--load` times the fitted capacity, Free shed on
overload. That scenario runs in the simulator and live, the same arrivals replayed in real time
through the gateway to the same llama-server (`bench.fidelity_rig.run_fidelity` with its
URL), with a fixed window of the fitted batch and then with AIMD. Prints the calibration's
error per point, each run's comparison, and the load average beside each. The report: FIDELITY.md.

    python bench/fidelity_llama.py [--duration 90] [--parallel 4] [--controller both]
                                   [--engine-cpu N]

After each run the engine is timed again at a full batch for each prompt length (the
calibration's own bursts): `engine drift` says how far its times per token and to first token
moved since the calibration. On these VMs they moved by up to ~10 % within minutes, and at
1.5x overload Free's admitted fraction moves about 2.5x as much as the capacity does. The
line after it runs the simulator again with the fit's time terms scaled by that drift (the
mean ratio of the times per token) and counts the checks within the bar against it: how
much of a miss the engine's own change of speed explains. A diagnostic: the check is the
calibrated simulator's.
Beside it, for the calibration and for each replay, `engine during ...`: the engine's own CPU
per decode step (its process's CPU time over `llamacpp:n_decode_total`) and the fit's step
time for as many prompt and output tokens: the engine's speed in each phase, measured by the
engine.

`--engine-cpu N` runs llama-server on CPU N alone and this process (the gateway, the client,
Redis) on the others: the engine then has a core of its own, as it has its own GPU in a
deployment, and its step times no longer depend on what the gateway is doing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import httpx2  # noqa: E402
import trio  # noqa: E402

from backends.redis.embedded import EmbeddedRedis  # noqa: E402
from bench.fidelity_rig import Fidelity, Tolerances, compare, run_fidelity, sim_outcomes  # noqa: E402
from scheduler.calibrate import Bounds, Profiler, calibrate  # noqa: E402
from scheduler.models.exposition import read_series  # noqa: E402
from scheduler.models.gpu import GpuConfig  # noqa: E402
from sim.calibration import ERROR_COLUMNS, Fit, Point, backends_section, error_table  # noqa: E402
from sim.engine import simulate  # noqa: E402
from sim.engine.capacity import capacity_rps  # noqa: E402
from sim.engine.model import BackendPool, Scenario  # noqa: E402
from sim.report import format_table  # noqa: E402
from sim.scenario import parse_scenario  # noqa: E402
from tests.support.llama_server import (  # noqa: E402
    MODEL_ALIAS,
    LlamaServer,
    ServerOptions,
    ensure_llama_server,
    ensure_model,
)

PROMPT_MEAN, OUTPUT_MEAN = 96, 16
# each burst 9 times, not `scheduler calibrate`'s 3: six calibrations of one engine fitted
# 7.38-7.68 requests/s of this workload with 3 rounds (4 %, which moves Free's admitted
# fraction ~10 % at 1.5x), 7.57-7.66 with 9 (FIDELITY.md, 2026-12-04 later); ~80 s instead of 26
CALIBRATION_ROUNDS = 9
SIZES = f"""prompt_tokens = {{ dist = "lognormal", mean = {PROMPT_MEAN}, sigma = 0.5, max = 600 }}
output_tokens = {{ dist = "lognormal", mean = {OUTPUT_MEAN}, sigma = 0.4, max = 64 }}"""


def scenario_text(
    fit: Fit,
    *,
    duration_s: float,
    load: float,
    controller: str,
    shares: tuple[float, float, float] = (0.2, 0.2, 0.6),
) -> str:
    """The workload (not the calibration's bursts): Enterprise, Pro and Free at `shares` of
    `load` times the fitted capacity for these sizes."""
    capacity = capacity_rps(BackendPool(count=1, gpu=fit.gpu), PROMPT_MEAN, OUTPUT_MEAN)
    rate = load * capacity
    slots = fit.gpu.max_batch
    if controller == "fixed":
        control = f'[controller]\nkind = "fixed"\nfixed_limit = {slots}\n'
    else:
        control = (
            f'[controller]\nkind = "aimd"\nmode = "window"\ninitial_limit = {slots}\n'
            f"min_limit = 1\nmax_limit = {4 * slots}\nincrease_step = 1\ndecrease_factor = 0.7\n"
            "target_latency_s = 1.5\npressure_threshold = 0.8\ncooldown_s = 2.0\ntick_s = 0.25\n"
        )
    tiers = ""
    for (name, weight, wait, slo, shed), share in zip(
        (
            ("enterprise", 8, 10, 5, "false"),
            ("pro", 3, 4, 6, "false"),
            ("free", 1, 2, 8, "true"),
        ),
        shares,
        strict=True,
    ):
        tiers += (
            f'\n[[tiers]]\nname = "{name}"\nweight = {weight}\nmax_wait_s = {wait}\n'
            f"slo_latency_s = {slo}\nrate_rps = {share * rate:.3f}\nkeys = 10\n"
            f"shed_on_overload = {shed}\n{SIZES}\n"
        )
    head = f'name = "llama_fidelity_{controller}"\nduration_s = {duration_s}\nseed = 23\n'
    return head + "\n" + backends_section(fit) + "\n" + control + tiers


async def drift(url: str, bounds: Bounds, fit: Fit) -> tuple[str, float]:
    """The calibration's widest bursts within the batch again, against what they measured;
    and the mean ratio of their times per token, now to then."""
    pool = httpx2.Limits(max_connections=fit.gpu.max_batch + 4, max_keepalive_connections=0)
    groups: list[list[Point]] = []  # the calibration's points, one list per prompt, in order
    for e in fit.errors:
        if not groups or groups[-1][-1].prompt_tokens != e.point.prompt_tokens:
            groups.append([])
        groups[-1].append(e.point)
    parts, ratios = [], []
    async with httpx2.AsyncClient(timeout=bounds.request_timeout_s, limits=pool) as client:
        profiler = Profiler(client, url, MODEL_ALIAS, bounds)
        for asked, points in zip(bounds.prompts, groups, strict=True):
            old = max(
                (p for p in points if p.concurrency <= fit.gpu.max_batch),
                key=lambda p: p.concurrency,
            )
            new = await profiler.burst(old.concurrency, asked)
            ratios.append(new.tpot_s / old.tpot_s)
            parts.append(
                f"c={old.concurrency} prompt {old.prompt_tokens}: tpot {1000 * old.tpot_s:.2f} -> "
                f"{1000 * new.tpot_s:.2f} ms ({100 * (new.tpot_s / old.tpot_s - 1):+.1f}%), "
                f"ttft {1000 * old.ttft_s:.0f} -> {1000 * new.ttft_s:.0f} ms "
                f"({100 * (new.ttft_s / old.ttft_s - 1):+.1f}%)"
            )
    return "engine drift since the calibration: " + "; ".join(parts), statistics.mean(ratios)


def at_drift(fidelity: Fidelity, ratio: float) -> str:
    """How the live run compares with the simulator given the engine as the drift check
    found it after the run (the fit's time terms times `ratio`): the share of the bar's
    misses that the engine's own change of speed explains. A diagnostic, not the check."""
    scenario = fidelity.scenario
    shifted = replace(
        scenario, backends=replace(scenario.backends, gpu=scenario.backends.gpu.scaled(ratio))
    )
    checks = compare(sim_outcomes(simulate(shifted)), fidelity.live, Tolerances())
    missed = [f"{c.tier} {c.metric} {100 * c.difference:.1f}%" for c in checks if not c.ok]
    return (
        f"the simulator with the engine's time terms x{ratio:.3f} (its speed after the run): "
        f"{len(checks) - len(missed)} of {len(checks)} within the bar"
        + (f"; over: {', '.join(missed)}" if missed else "")
    )


@dataclass(frozen=True, slots=True)
class EngineMeter:
    """llama-server's own counters at one moment: its CPU time and `/metrics` totals."""

    cpu_s: float
    decodes: float
    prompt_tokens: float
    output_tokens: float

    @classmethod
    def read(cls, server: LlamaServer) -> EngineMeter:
        text = httpx2.get(server.url + "/metrics", timeout=10).text
        found = read_series(text, _COUNTERS)
        decodes, prompt, output = (sum(found[name].values()) for name in _COUNTERS)
        return cls(server.cpu_s(), decodes, prompt, output)

    def since(self, start: EngineMeter, what: str, gpu: GpuConfig) -> str:
        """Per decode step since `start`: the engine's CPU time (one thread, pinned: its
        busy time) and what the fit's step time gives for as many prompt and output tokens
        (its base, per-sequence and prompt terms; not the context, join or lone-sequence
        terms: only the mean sequences per step are known)."""
        decodes = max(1.0, self.decodes - start.decodes)
        prompt = (self.prompt_tokens - start.prompt_tokens) / decodes
        output = (self.output_tokens - start.output_tokens) / decodes
        model_s = (
            gpu.decode_base_s + gpu.decode_per_seq_s * output + gpu.prefill_s_per_token * prompt
        )
        return (
            f"engine during {what}: {decodes:.0f} decodes, {prompt:.1f} prompt and "
            f"{output:.2f} output tokens each, {1000 * (self.cpu_s - start.cpu_s) / decodes:.2f} "
            f"ms CPU per decode (the fit's step for those tokens: {1000 * model_s:.2f} ms)"
        )


_COUNTERS = (
    "llamacpp:n_decode_total",
    "llamacpp:prompt_tokens_total",
    "llamacpp:tokens_predicted_total",
)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of each run")
    parser.add_argument("--parallel", type=int, default=4, help="llama-server's slots")
    parser.add_argument(
        "--threads", type=int, default=1, help="llama-server's threads (see FIDELITY.md)"
    )
    parser.add_argument("--load", type=float, default=1.5, help="offered / fitted capacity")
    parser.add_argument("--controller", choices=("fixed", "aimd", "both"), default="both")
    parser.add_argument("--engine-cpu", type=int, help="llama-server on this CPU alone")
    args = parser.parse_args()
    if args.engine_cpu is not None:  # before Redis and the engine start: they inherit it
        os.sched_setaffinity(0, os.sched_getaffinity(0) - {args.engine_cpu})
    build = ensure_llama_server(log=_log)
    options = ServerOptions(
        parallel=args.parallel, ctx_size=args.parallel * 2048, threads=args.threads
    )
    failed = False
    with LlamaServer(build, ensure_model(build), options) as server, EmbeddedRedis() as redis:
        if args.engine_cpu is not None:
            server.pin({args.engine_cpu})
        bounds = Bounds(
            prompts=(48, 192),
            output_tokens=OUTPUT_MEAN,
            max_concurrency=16,
            rounds=CALIBRATION_ROUNDS,
            max_requests=800,
            time_limit_s=240.0,
        )
        print(f"calibrating llama-server {options}, load average {_load()}")
        before = EngineMeter.read(server)
        fit = trio.run(calibrate, server.url, MODEL_ALIAS, bounds, _log)
        print(EngineMeter.read(server).since(before, "the calibration", fit.gpu))
        print(format_table(ERROR_COLUMNS, error_table(fit)))
        print(f"mean error {100 * fit.mean_error:.1f}%, load average {_load()}")
        print(backends_section(fit))
        controllers = ("fixed", "aimd") if args.controller == "both" else (args.controller,)
        for controller in controllers:
            text = scenario_text(
                fit, duration_s=args.duration, load=args.load, controller=controller
            )
            scenario: Scenario = parse_scenario(text, source=f"llama_{controller}.toml")
            started = time.monotonic()
            run = partial(run_fidelity, scenario, redis_url=redis.url, backend_urls=[server.url])
            before = EngineMeter.read(server)
            fidelity = trio.run(run)
            replayed = EngineMeter.read(server).since(before, "the replay", fit.gpu)
            print(f"\nwall {time.monotonic() - started:.0f} s, load average {_load()}")
            print(fidelity.report())
            print(replayed, flush=True)
            drifted, ratio = trio.run(drift, server.url, bounds, fit)
            print(drifted)
            print(at_drift(fidelity, ratio), flush=True)
            failed = failed or not fidelity.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
