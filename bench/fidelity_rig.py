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

    arrival_schedule(scenario)   the simulator's arrivals, as a list
    gateway_config(...)          the gateway's TOML, derived from the scenario
    run_live(...)                the gateway in this trio process, in front of demo server(s)
                                 or of running engines (`backend_urls`); the replay
    run_fidelity(...)            both runs and the per-tier comparison (`Fidelity.report()`)

How the two sides are made to mean the same thing:
- a request's prompt is `4 P - 1` characters on `/v1/completions`, which the gateway's
  estimate and the demo's count both read as exactly P tokens (0 reads as 1), and its
  `max_tokens` is the scenario's output size, which the demo produces exactly; so the cost
  the fair queue charges (prompt + output) and the GPU's work are the simulator's;
- each scenario key is a `[[keys]]` entry of its tier; the ladder is `["reject"]` and the
  response cache is off (the schedule's prompts are distinct, and a cache would only add
  Redis traffic); quotas map to the tier's quota table when the scenario has them;
- the service runs AIMD only: a `fixed` scenario controller becomes AIMD pinned at the
  fixed limit (min = max = initial) that never reports congestion from latency or pressure
  (backend 503s still would, as they make AIMD congested: keep the limit within the GPU's
  batch plus waiting room);
- the probe reads waiting requests against the GPU's `max_batch`, as the simulator's
  `pool_pressure` does, and scrapes once per controller tick;
- latency: the simulator's runs from arrival to completion (queue wait included), the live
  one from the client's send to the end of the response. The HTTP hops and the gateway add
  ~5 ms to a request, and each freed slot is refilled a few ms late (demo -> gateway ->
  dispatcher -> demo): ~12 ms per request in all on a busy 2-core machine, unmodelled.
  An admitted request is a 200, or a 503 that the backend (not the gateway) gave, as the
  simulator's admitted count includes its drops; a shed one is a 503 with `x-scheduler-shed`.

The comparison's relative difference is |live - sim| / max(sim, floor); the floor (5 % for
fractions) keeps a fraction near zero from turning a handful of requests into an infinite
relative error, so below it the tolerance is absolute (10 % of 5 % = half a point).
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import trio

from backends.demo.server import DemoConfig, serve_demo_backend
from scheduler.service.config import load_settings
from scheduler.service.serve import serve_replica
from sim.engine import SimResult, simulate
from sim.engine.arrivals import ArrivalRow, TierArrivals
from sim.engine.model import ControllerKind, QuotaUnit, Scenario
from sim.engine.results import Percentiles, percentile
from sim.report import format_table

MODEL = "demo-small"
ADMIN_TOKEN = "fidelity-admin"
SHED_HEADER = "x-scheduler-shed"
_START_DELAY_S = 0.5  # between the gateway's readiness and the schedule's time 0
_CLIENT_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of the schedule: when, from which tier and key, and how big."""

    at_s: float
    tier: str
    key: str
    prompt_tokens: int
    output_tokens: int


def arrival_schedule(scenario: Scenario, *, seed: int | None = None) -> list[Arrival]:
    """The arrivals the simulator draws for `seed` (the scenario's own when None), in order.

    The engine's own `TierArrivals`, built as `Simulation` builds them; each draws times,
    keys and sizes from generators of its own, so taking the whole run at once gives the
    same draws as the engine's window-by-window loop."""
    seed = scenario.seed if seed is None else seed
    sources = [
        TierArrivals(
            i,
            tier,
            spikes=scenario.spikes,
            diurnal=scenario.diurnal,
            duration_s=scenario.duration_s,
            seed=seed,
        )
        for i, tier in enumerate(scenario.tiers)
    ]
    rows: list[ArrivalRow] = []
    for source in sources:
        source.until(scenario.duration_s, rows)
    rows.sort()
    return [
        Arrival(at, sources[ti].tier.name, sources[ti].key_names[k], p, o)
        for at, ti, k, p, o in rows
    ]


def prompt_text(request_id: int, prompt_tokens: int) -> str:
    """A prompt of its own for each request that both the gateway's estimate and the demo
    count as `prompt_tokens` tokens: 4 P - 1 characters on `/v1/completions`."""
    length = max(0, 4 * prompt_tokens - 1)
    tag = f"{request_id:x}-"
    if length <= len(tag):
        return tag[len(tag) - length :]
    return tag + "x" * (length - len(tag))


def clear_key(arrival: Arrival) -> str:
    """The API key the replay sends for `arrival` (a trace may reuse a name in two tiers)."""
    return f"sk-{arrival.tier}/{arrival.key}"


def check_live(scenario: Scenario, *, redis_url: str | None) -> None:
    """Refuse what a live replay cannot reproduce; ValueError names it."""
    problems = []
    if scenario.fallback is not None:
        problems.append("a fallback pool")
    if scenario.capacity_events:
        problems.append("capacity events")
    if scenario.controller.kind is ControllerKind.GRADIENT:
        problems.append("the gradient controller (the service runs AIMD)")
    for tier in scenario.tiers:
        if tier.cache_hit_ratio > 0:
            problems.append(f"tiers.{tier.name}.cache_hit_ratio (distinct prompts never hit)")
        if tier.quota is not None and redis_url is None:
            problems.append(f"tiers.{tier.name}.quota without a Redis URL")
    if problems:
        raise ValueError("a live replay cannot reproduce " + ", ".join(problems))


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def _table(header: str, values: Mapping[str, object]) -> list[str]:
    return [header, *(f"{name} = {_toml(value)}" for name, value in values.items()), ""]


def controller_values(scenario: Scenario) -> dict[str, object]:
    """The gateway's `[controller]` table for the scenario's controller."""
    spec = scenario.controller
    aimd = dataclasses.asdict(spec.aimd)
    aimd["latency_signal"] = spec.aimd.latency_signal.value
    if spec.kind is ControllerKind.FIXED:
        limit = spec.fixed_limit
        aimd.update(initial_limit=limit, min_limit=limit, max_limit=limit)
        aimd.update(target_latency_s=1e9, pressure_threshold=1.0)
    return {"mode": spec.mode.value, "burst_s": spec.burst_s, **aimd}


def gateway_config(
    scenario: Scenario, backend_urls: Sequence[str], schedule: Sequence[Arrival]
) -> str:
    """The gateway's config file for `scenario`: its tiers, the keys `schedule` uses, one
    model served by `backend_urls`, and the controller."""
    lines: list[str] = []
    for tier in scenario.tiers:
        values: dict[str, object] = {
            "weight": tier.weight,
            "max_wait_s": tier.max_wait_s,
            "max_depth": tier.max_depth,
            "shed_on_overload": tier.shed_on_overload,
            "slo_s": tier.slo_latency_s,
            "ladder": ["reject"],  # what the simulator's ladder does without cache or fallback
        }
        lines += _table(f"[tiers.{json.dumps(tier.name)}]", values)
        if tier.quota is not None:
            q = tier.quota
            unit = "requests" if q.unit is QuotaUnit.REQUESTS else "tokens"
            quota: dict[str, object] = {
                "algorithm": q.algorithm.value,  # the service spells them the same
                "period_s": q.period_s,
                unit: q.limit,
                ("request_burst" if unit == "requests" else "token_burst"): q.burst or 0,
            }
            lines += _table(f"[tiers.{json.dumps(tier.name)}.quota]", quota)
    for tier_name, key, clear in sorted({(a.tier, a.key, clear_key(a)) for a in schedule}):
        lines += _table("[[keys]]", {"key": clear, "tenant": key, "tier": tier_name})
    model = {"backends": list(backend_urls), "cache_fresh_s": 0.0}
    lines += _table(f"[models.{MODEL}]", model)
    tick_s = scenario.controller.tick_s
    probe = {
        "interval_s": tick_s,
        "stale_after_s": max(2.0, 4 * tick_s),
        "waiting_saturation": float(scenario.backends.gpu.max_batch),
    }
    lines += _table(f"[models.{MODEL}.pressure]", probe)
    lines += _table("[controller]", controller_values(scenario))
    return "\n".join(lines)


# -- the live run ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LiveOutcome:
    """What the client saw of one request."""

    status: int  # 0: no response (a client-side error)
    shed: bool  # the gateway shed it (its 503 names a reason)
    latency_s: float  # send to the end of the response
    lag_s: float  # how late it was sent against the schedule


@dataclass(frozen=True, slots=True)
class LiveRun:
    outcomes: tuple[LiveOutcome, ...]  # one per arrival, in schedule order
    limits: tuple[tuple[float, float], ...]  # (t_s, the controller's limit), every sample_s
    config: str  # the gateway's TOML


async def run_live(
    scenario: Scenario,
    schedule: Sequence[Arrival],
    *,
    redis_url: str | None = None,
    backend_urls: Sequence[str] = (),
) -> LiveRun:
    """Start the gateway in this trio process on loopback, in front of `backend_urls` (running
    engines) or else of a demo server per backend of the scenario, replay `schedule` in real
    time, and stop what it started."""
    check_live(scenario, redis_url=redis_url)
    demo = DemoConfig(gpu=scenario.backends.gpu, model_names=(MODEL,))
    async with trio.open_nursery() as servers:
        urls = list(backend_urls)
        for _ in range(0 if urls else scenario.backends.count):
            port = await servers.start(serve_demo_backend, demo)
            urls.append(f"http://127.0.0.1:{port}")
        config = gateway_config(scenario, urls, schedule)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "gateway.toml"
            path.write_text(config, encoding="utf-8")
            env = {"SCHEDULER_ADMIN_TOKEN": ADMIN_TOKEN}
            settings = load_settings(path, env=env, overrides={"port": 0})
        # Redis keys of its own: a deployment's live gains or spent quotas on the same Redis
        # would otherwise be this run's (the replica follows the gains document it finds)
        prefix = f"fidelity-{uuid.uuid4().hex[:12]}"
        settings = dataclasses.replace(
            settings, redis_url=redis_url, redis_prefix=prefix, source=None
        )
        port = await servers.start(serve_replica, settings)
        outcomes, limits = await _replay(f"http://127.0.0.1:{port}", scenario, schedule)
        servers.cancel_scope.cancel()
    return LiveRun(outcomes, limits, config)


async def _replay(
    gateway: str, scenario: Scenario, schedule: Sequence[Arrival]
) -> tuple[tuple[LiveOutcome, ...], tuple[tuple[float, float], ...]]:
    outcomes: list[LiveOutcome | None] = [None] * len(schedule)
    limits: list[tuple[float, float]] = []
    pool = httpx2.Limits(max_connections=4096, max_keepalive_connections=4096)
    async with httpx2.AsyncClient(timeout=_CLIENT_TIMEOUT_S, limits=pool) as client:
        await _wait_settled(client, gateway, scenario)
        start = trio.current_time() + _START_DELAY_S
        run_id = secrets.randbits(40) << 20  # a real engine caches prompts it has seen

        async def one(i: int, arrival: Arrival) -> None:
            body = {
                "model": MODEL,
                "prompt": prompt_text(run_id + i, arrival.prompt_tokens),
                "max_tokens": arrival.output_tokens,
                "ignore_eos": True,  # a real engine's random model stops early otherwise
            }
            headers = {"authorization": f"Bearer {clear_key(arrival)}"}
            sent = trio.current_time()
            try:
                r = await client.post(gateway + "/v1/completions", json=body, headers=headers)
                status, shed = r.status_code, SHED_HEADER in r.headers
            except httpx2.HTTPError:
                status, shed = 0, False
            done = trio.current_time()
            outcomes[i] = LiveOutcome(status, shed, done - sent, sent - start - arrival.at_s)

        async with trio.open_nursery() as load:
            load.start_soon(_watch_limit, client, gateway, start, scenario, limits)
            for i, arrival in enumerate(schedule):
                await trio.sleep_until(start + arrival.at_s)
                load.start_soon(one, i, arrival)
    assert all(o is not None for o in outcomes)
    return tuple(o for o in outcomes if o is not None), tuple(limits)


async def _controller(client: httpx2.AsyncClient, gateway: str) -> dict[str, Any]:
    r = await client.get(
        gateway + "/admin/v1/controller", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    r.raise_for_status()
    state: dict[str, Any] = r.json()
    return state


async def _wait_settled(client: httpx2.AsyncClient, gateway: str, scenario: Scenario) -> None:
    """Let the controller tick a few times idle, then check that it still holds its initial
    limit (a tick before the probe's first scrape would see stale pressure and cut it)."""
    spec = scenario.controller
    initial = spec.fixed_limit if spec.kind is ControllerKind.FIXED else spec.aimd.initial_limit
    await trio.sleep(3 * spec.tick_s)
    state = await _controller(client, gateway)
    if state["limit"] != initial or state["pressure"] >= 1.0:
        raise RuntimeError(f"the gateway's controller is not at its initial state: {state}")


async def _watch_limit(
    client: httpx2.AsyncClient,
    gateway: str,
    start: float,
    scenario: Scenario,
    into: list[tuple[float, float]],
) -> None:
    """The controller's limit at the simulator's sample times, over the schedule."""
    k = 1
    while k * scenario.sample_s <= scenario.duration_s:
        await trio.sleep_until(start + k * scenario.sample_s)
        state = await _controller(client, gateway)
        into.append((trio.current_time() - start, float(state["limit"])))
        k += 1


# -- the comparison --------------------------------------------------------------------------


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
        for metric, a, b in (
            ("admitted", s.admitted_fraction, v.admitted_fraction),
            ("shed", s.shed_fraction, v.shed_fraction),
        ):
            diff = relative_difference(a, b, tol.fraction_floor)
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
    sim_limits: tuple[float, ...]  # the controller's limit, sampled every sample_s
    live_limits: tuple[float, ...]
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
            f"controller limit mean: sim {_mean(self.sim_limits):.1f}, "
            f"live {_mean(self.live_limits):.1f}",
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
        sim_limits=tuple(
            limit
            for t, limit in zip(series.t, series.limit, strict=True)
            if t <= scenario.duration_s
        ),
        live_limits=tuple(limit for _, limit in live.limits),
        lags_s=tuple(o.lag_s for o in live.outcomes),
    )
