"""Fidelity: one scenario in the simulator and live, and how far apart the two land.

Why a replay and not two independent runs: the simulator draws its arrivals from seeded
generators (`sim.engine.arrivals.TierArrivals`, one per tier); the live run replays exactly
that schedule (tier, key, prompt and output tokens, offset from the start) in real time,
open-model (each request goes out at its time whatever the earlier ones are doing), against
the gateway in front of demo GPU servers. Both sides run the same scheduling core and the same
GPU model, so what is left to differ is what the simulator leaves out: HTTP, the event loop,
the pressure probe's scrape interval. The arrivals' sampling noise cancels, since both see the
same requests; which of them wait still hinges on millisecond timing, which a short run's
percentiles feel (see tests/sim/test_fidelity.py). Against a real engine (`backend_urls`:
llama.cpp's llama-server, say) the GPU model is a fit (`scheduler calibrate`), and what differs
is also how far the engine is from the model.

    arrival_schedule(scenario)   the simulator's arrivals (bench/fidelity_schedule.py, with
    gateway_config(...)          the gateway's TOML and how both sides mean the same thing)
    run_live(...)                the gateway and the replay (bench/fidelity_live.py)
    run_fidelity(...)            both runs and the per-tier comparison (`Fidelity.report()`)

How the comparison reads the two sides:
- latency: the simulator's runs from arrival to completion (queue wait included), the live
  one from the client's send to the end of the response. The HTTP hops and the gateway add
  ~5 ms to a request, and each freed slot is refilled a few ms late (demo -> gateway ->
  dispatcher -> demo): ~12 ms per request in all on a busy 2-core machine, unmodelled.
  An admitted request is a 200, or a 503 that the backend (not the gateway) gave, as the
  simulator's admitted count includes its drops; a shed one is a 503 with `x-scheduler-shed`.

The comparison's relative difference is |live - sim| / max(sim, floor); the floor (5 % for
fractions) keeps a fraction near zero from turning a handful of requests into an infinite
relative error, so below it the tolerance is absolute (10 % of 5 % = half a point), and
never finer than one and a half of the tier's requests: a single request more or less on
one side (one shed of ~200 is half a point: it decided most runs against llama-server) is
below what the comparison can resolve, two are not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.fidelity_live import ControllerSample, LiveRun, run_live
from bench.fidelity_schedule import Arrival, arrival_schedule
from sim.engine import SimResult, simulate
from sim.engine.model import Scenario
from sim.engine.results import Percentiles, percentile
from sim.report import format_table


@dataclass(frozen=True, slots=True)
class TierOutcome:
    """One tier's outcomes on one side, over the requests it offered."""

    name: str
    offered: int
    admitted: int
    shed: int
    refused: int  # by the key's quota (429)
    errors: int  # anything else (live only)
    completed: int
    latency_s: Percentiles

    @property
    def admitted_fraction(self) -> float:
        return self.admitted / self.offered if self.offered else math.nan

    @property
    def shed_fraction(self) -> float:
        return self.shed / self.offered if self.offered else math.nan


def sim_outcomes(result: SimResult) -> tuple[TierOutcome, ...]:
    return tuple(
        TierOutcome(
            name=t.name,
            offered=t.offered,
            admitted=t.admitted,
            shed=t.shed + t.served_from_cache + t.degraded_to_fallback,
            refused=t.refused_by_quota,
            errors=0,
            completed=t.completed,
            latency_s=t.latency_s,
        )
        for t in result.tiers
    )


def live_outcomes(
    scenario: Scenario, schedule: Sequence[Arrival], run: LiveRun
) -> tuple[TierOutcome, ...]:
    tiers = []
    for tier in scenario.tiers:
        mine = [o for a, o in zip(schedule, run.outcomes, strict=True) if a.tier == tier.name]
        ok = [o.latency_s for o in mine if o.status == 200]
        tiers.append(
            TierOutcome(
                name=tier.name,
                offered=len(mine),
                admitted=sum(o.status == 200 or (o.status == 503 and not o.shed) for o in mine),
                shed=sum(o.status == 503 and o.shed for o in mine),
                refused=sum(o.status == 429 for o in mine),
                errors=sum(o.status not in (200, 429, 503) for o in mine),
                completed=len(ok),
                latency_s=Percentiles.of(ok),
            )
        )
    return tuple(tiers)


@dataclass(frozen=True, slots=True)
class Tolerances:
    """The bounds: by default 10 % on fractions, 15 % on p50 and p95 latency."""

    fraction: float = 0.10
    p50: float = 0.15
    p95: float = 0.15
    fraction_floor: float = 0.05  # relative differences of fractions are over at least this
    min_requests: float = 1.5  # and the absolute tolerance is at least this many requests
    min_completed: int = 20  # fewer completions on a side: its percentiles are not compared


@dataclass(frozen=True, slots=True)
class Check:
    tier: str
    metric: str
    sim: float
    live: float
    difference: float  # relative, see the module docstring
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.difference <= self.tolerance


def relative_difference(sim: float, live: float, floor: float = 1e-9) -> float:
    if math.isnan(sim) or math.isnan(live):
        return math.inf
    return abs(live - sim) / max(abs(sim), floor)


def compare(
    sim: Sequence[TierOutcome], live: Sequence[TierOutcome], tol: Tolerances
) -> tuple[Check, ...]:
    checks: list[Check] = []
    for s, v in zip(sim, live, strict=True):
        offered = max(1, min(s.offered, v.offered))
        floor = max(tol.fraction_floor, tol.min_requests / (tol.fraction * offered))
        for metric, a, b in (
            ("admitted", s.admitted_fraction, v.admitted_fraction),
            ("shed", s.shed_fraction, v.shed_fraction),
        ):
            diff = relative_difference(a, b, floor)
            checks.append(Check(s.name, metric, a, b, diff, tol.fraction))
        if min(s.completed, v.completed) < tol.min_completed:
            continue
        for metric, a, b, bound in (
            ("p50 s", s.latency_s.p50, v.latency_s.p50, tol.p50),
            ("p95 s", s.latency_s.p95, v.latency_s.p95, tol.p95),
        ):
            checks.append(Check(s.name, metric, a, b, relative_difference(a, b), bound))
    return tuple(checks)


@dataclass(frozen=True, slots=True)
class Fidelity:
    """Both runs of one scenario and how they compare."""

    scenario: Scenario
    sim: tuple[TierOutcome, ...]
    live: tuple[TierOutcome, ...]
    checks: tuple[Check, ...]
    sim_controller: tuple[ControllerSample, ...]  # sampled every sample_s
    live_controller: tuple[ControllerSample, ...]
    lags_s: tuple[float, ...]  # how late each live request was sent

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and not any(t.errors for t in self.live)

    def report(self) -> str:
        """Counts, then the controller and the client's timing, then the comparison table."""
        counts = format_table(
            ("tier", "offered", "sim adm/shed/quota", "live adm/shed/quota/err"),
            [
                (
                    s.name,
                    s.offered,
                    f"{s.admitted}/{s.shed}/{s.refused}",
                    f"{v.admitted}/{v.shed}/{v.refused}/{v.errors}",
                )
                for s, v in zip(self.sim, self.live, strict=True)
            ],
        )
        lags = sorted(self.lags_s)
        lines = [
            f"fidelity: scenario {self.scenario.name}, {self.scenario.duration_s:g} s, "
            f"controller {self.scenario.controller.label}, {len(lags)} requests",
            counts,
            *controller_lines(self.sim_controller, self.live_controller),
            f"send lag: p99 {1000 * percentile(lags, 0.99):.1f} ms, "
            f"max {1000 * (lags[-1] if lags else math.nan):.1f} ms",
            format_table(
                ("tier", "metric", "sim", "live", "diff", "limit", "ok"),
                [
                    (
                        c.tier,
                        c.metric,
                        f"{c.sim:.3f}",
                        f"{c.live:.3f}",
                        f"{100 * c.difference:.1f}%",
                        f"{100 * c.tolerance:.0f}%",
                        "yes" if c.ok else "NO",
                    )
                    for c in self.checks
                ],
            ),
            "fidelity: " + ("PASS" if self.ok else "FAIL"),
        ]
        return "\n".join(lines)


def controller_lines(
    sim: Sequence[ControllerSample], live: Sequence[ControllerSample]
) -> list[str]:
    """Each side's mean limit, in-flight and pressure, then the pressure each side read at
    each in-flight count (where the controller's threshold falls decides where its limit
    settles), and the engines' own counts where the live side has them."""

    def means(samples: Sequence[ControllerSample]) -> str:
        return (
            f"limit {_mean([c.limit for c in samples]):.2f}, "
            f"in flight {_mean([c.inflight for c in samples]):.2f}, "
            f"pressure {_mean([c.pressure for c in samples]):.3f}"
        )

    lines = [f"controller mean: sim {means(sim)}; live {means(live)}"]
    engine = [c for c in live if c.engine_running is not None]
    if engine:
        running = _mean([c.engine_running or 0.0 for c in engine])
        waiting = _mean([c.engine_waiting or 0.0 for c in engine])
        lines.append(
            f"engines (live, their /metrics): running {running:.2f}, waiting {waiting:.2f}"
        )
    counts = sorted({c.inflight for c in (*sim, *live)})
    rows = []
    for k in counts:
        at_sim = [c.pressure for c in sim if c.inflight == k]
        at_live = [c for c in live if c.inflight == k]
        queued = [c.engine_waiting for c in at_live if c.engine_waiting is not None]
        rows.append(
            (
                k,
                f"{len(at_sim)} / {len(at_live)}",
                f"{_mean(at_sim):.3f} / {_mean([c.pressure for c in at_live]):.3f}",
                f"{_mean(queued):.2f}" if queued else "-",
            )
        )
    header = ("in flight", "samples sim / live", "pressure sim / live", "engine waiting live")
    lines.append(format_table(header, rows))
    return lines


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


async def run_fidelity(
    scenario: Scenario,
    *,
    seed: int | None = None,
    redis_url: str | None = None,
    tolerances: Tolerances | None = None,
    backend_urls: Sequence[str] = (),
) -> Fidelity:
    """Simulate `scenario`, replay the same arrivals live (against demo servers, or the
    running engines at `backend_urls`), and compare per tier."""
    schedule = arrival_schedule(scenario, seed=seed)
    result = simulate(scenario, seed=seed)
    live = await run_live(scenario, schedule, redis_url=redis_url, backend_urls=backend_urls)
    sim_side, live_side = sim_outcomes(result), live_outcomes(scenario, schedule, live)
    series = result.series
    return Fidelity(
        scenario=scenario,
        sim=sim_side,
        live=live_side,
        checks=compare(sim_side, live_side, tolerances or Tolerances()),
        sim_controller=tuple(
            ControllerSample(t, limit, pressure, inflight)
            for t, limit, pressure, inflight in zip(
                series.t, series.limit, series.pressure, series.inflight, strict=True
            )
            if t <= scenario.duration_s
        ),
        live_controller=live.controller,
        lags_s=tuple(o.lag_s for o in live.outcomes),
    )
