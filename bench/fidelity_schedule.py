"""The fidelity rig's schedule and gateway: a scenario made into the arrivals a live replay
sends and the config of the gateway it sends them to.

    arrival_schedule(scenario)   the simulator's arrivals, as a list
    gateway_config(...)          the gateway's TOML, derived from the scenario

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
- the probe is the simulator's (`sim.engine.state.probe_config`, one source for both): it
  reads waiting requests against the GPU's `max_batch` and scrapes once per controller tick.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sim.engine.arrivals import ArrivalRow, TierArrivals
from sim.engine.model import ControllerKind, QuotaSpec, QuotaUnit, Scenario
from sim.engine.state import probe_config

MODEL = "demo-small"


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


def _quota(q: QuotaSpec) -> dict[str, object]:
    """A simulator's quota as the service's quota table."""
    unit = "requests" if q.unit is QuotaUnit.REQUESTS else "tokens"
    return {
        "algorithm": q.algorithm.value,  # the service spells them the same
        "period_s": q.period_s,
        unit: q.limit,
        ("request_burst" if unit == "requests" else "token_burst"): q.burst or 0,
    }


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
            "fail_fast": tier.fail_fast,
            "slo_s": tier.slo_latency_s,
            "ladder": ["reject"],  # what the simulator's ladder does without cache or fallback
        }
        lines += _table(f"[tiers.{json.dumps(tier.name)}]", values)
        if tier.quota is not None:
            lines += _table(f"[tiers.{json.dumps(tier.name)}.quota]", _quota(tier.quota))
    tenants: dict[str, QuotaSpec] = {}
    for tier_name, key, clear in sorted({(a.tier, a.key, clear_key(a)) for a in schedule}):
        tier = scenario.tier(tier_name)
        tenant = tier.tenant_of(key)
        if tier.tenant_quota is not None:
            tenants[tenant] = tier.tenant_quota
        lines += _table("[[keys]]", {"key": clear, "tenant": tenant, "tier": tier_name})
    for tenant, spec in sorted(tenants.items()):
        lines += _table(f"[tenants.{json.dumps(tenant)}.quota]", _quota(spec))
    model = {"backends": list(backend_urls), "cache_fresh_s": 0.0}
    lines += _table(f"[models.{MODEL}]", model)
    if scenario.model_quota is not None:
        lines += _table(f"[models.{MODEL}.quota]", _quota(scenario.model_quota))
    tick_s = scenario.controller.tick_s
    pressure = probe_config(scenario.backends.gpu, tick_s)  # the simulator's probe
    probe = {
        "interval_s": tick_s,
        "stale_after_s": pressure.stale_after_s,
        "waiting_saturation": pressure.waiting_saturation,
    }
    lines += _table(f"[models.{MODEL}.pressure]", probe)
    lines += _table("[controller]", controller_values(scenario))
    return "\n".join(lines)
