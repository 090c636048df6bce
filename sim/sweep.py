"""Planning and tuning: run one scenario many times, changing one thing, on the same seed.

- `--sweep backends=1..16`: the smallest pool that holds every tier's SLO (p99 latency, arrival
  to completion) within its shed budget, with the table across counts.
- `--sweep increase_step=0.5,1,2 --sweep decrease_factor=0.5,0.7,0.9`: every combination of
  the controller's gains, each with a score (see `score`), and the best.

Every run of a sweep uses the same seed, hence the same arrivals: differences come from the
setting alone (common random numbers).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

from scheduler.errors import SchedulerError
from sim.engine import SimResult, simulate
from sim.engine.model import ControllerKind, ControllerSpec, Scenario
from sim.engine.results import TierResult

RunHook = Callable[[str, int, int], Callable[[float], None] | None]
"""Called before each run with (label, index, total); may return a progress callback."""


class SweepError(SchedulerError, ValueError):
    """A `--sweep` option that cannot be run; the message names the option."""


@dataclass(frozen=True, slots=True)
class SweepSpec:
    name: str
    values: tuple[float, ...]


def parse_sweep(text: str) -> SweepSpec:
    """`NAME=A..B` (integers, both ends included), `NAME=A..B:STEP`, or `NAME=V1,V2,...`."""
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not name or not spec.strip():
        raise SweepError(f"--sweep {text!r}: expected NAME=SPEC, e.g. backends=1..16")
    try:
        values = _values(spec.strip())
    except ValueError as exc:
        raise SweepError(f"--sweep {name}: {exc}") from None
    if not values:
        raise SweepError(f"--sweep {name}: no values in {spec!r}")
    return SweepSpec(name, values)


def _values(spec: str) -> tuple[float, ...]:
    if ".." in spec:
        bounds, _, step_text = spec.partition(":")
        low_text, _, high_text = bounds.partition("..")
        low, high = float(low_text), float(high_text)
        step = float(step_text) if step_text else 1.0
        if not step > 0 or high < low:
            raise ValueError(f"{spec!r} needs low <= high and a step > 0")
        count = math.floor((high - low) / step + 1e-9) + 1
        return tuple(round(low + i * step, 12) for i in range(count))
    return tuple(float(v) for v in spec.split(",") if v.strip())


def top_tier(scenario: Scenario) -> str:
    """The tier with the largest weight (the first of equals): the one held to its SLO first."""
    return max(scenario.tiers, key=lambda t: t.weight).name


def score(result: SimResult, top: str) -> float:
    """Goodput at SLO (0..1), less how far the top tier's p99 overshoots its SLO (as a
    fraction of it), less a tenth of the limit's oscillation."""
    tier = result.tier(top)
    p99 = tier.latency_s.p99
    overshoot = max(0.0, p99 / tier.slo_latency_s - 1) if not math.isnan(p99) else 0.0
    return result.goodput_ratio - overshoot - 0.1 * result.limit_oscillation()


# -- backends -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendRow:
    count: int
    result: SimResult
    failures: tuple[str, ...]

    @property
    def holds(self) -> bool:
        return not self.failures


def failures(result: SimResult) -> tuple[str, ...]:
    """Why a run misses a tier's SLO or shed budget (empty when it holds)."""
    found: list[str] = []
    for t in result.tiers:
        found.extend(_tier_failures(t))
    return tuple(found)


def _tier_failures(t: TierResult) -> list[str]:
    found: list[str] = []
    p99 = t.latency_s.p99
    if t.offered - t.refused_by_quota > 0 and (math.isnan(p99) or p99 > t.slo_latency_s):
        found.append(f"{t.name} p99 {p99:.2f} s > SLO {t.slo_latency_s:g} s")
    if t.shed_ratio > t.shed_budget:
        found.append(f"{t.name} shed {100 * t.shed_ratio:.1f}% > budget {100 * t.shed_budget:g}%")
    return found


def with_backends(scenario: Scenario, count: int) -> Scenario:
    events = tuple(replace(e, backends=min(e.backends, count)) for e in scenario.capacity_events)
    return replace(
        scenario,
        backends=replace(scenario.backends, count=count),
        capacity_events=events,
    )


def sweep_backends(
    scenario: Scenario, spec: SweepSpec, *, seed: int | None = None, hook: RunHook | None = None
) -> list[BackendRow]:
    counts = [int(v) for v in spec.values]
    if any(c != v or c < 1 for c, v in zip(counts, spec.values, strict=True)):
        raise SweepError(f"--sweep backends: counts must be whole numbers >= 1, got {spec.values}")
    rows: list[BackendRow] = []
    for i, count in enumerate(counts):
        progress = hook(f"backends={count}", i, len(counts)) if hook else None
        result = simulate(with_backends(scenario, count), seed=seed, on_progress=progress)
        rows.append(BackendRow(count, result, failures(result)))
    return rows


def pick_backends(rows: Sequence[BackendRow]) -> BackendRow | None:
    """The smallest count that holds, if any does."""
    holding = [r for r in rows if r.holds]
    return min(holding, key=lambda r: r.count) if holding else None


# -- controller gains -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GainRow:
    values: tuple[tuple[str, float], ...]
    result: SimResult
    score: float

    def label(self) -> str:
        return " ".join(f"{k}={v:g}" for k, v in self.values)


def gain_names(controller: ControllerSpec) -> tuple[str, ...]:
    config = controller.gradient if controller.kind is ControllerKind.GRADIENT else controller.aimd
    return tuple(f.name for f in fields(config) if isinstance(getattr(config, f.name), int | float))


def with_gains(scenario: Scenario, values: dict[str, float]) -> Scenario:
    ctrl = scenario.controller
    try:
        if ctrl.kind is ControllerKind.GRADIENT:
            gradient = replace(ctrl.gradient, **values)  # type: ignore[arg-type]
            return replace(scenario, controller=replace(ctrl, gradient=gradient))
        aimd = replace(ctrl.aimd, **values)  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise SweepError(f"--sweep: {exc}") from None
    return replace(scenario, controller=replace(ctrl, aimd=aimd))


def sweep_gains(
    scenario: Scenario,
    specs: Sequence[SweepSpec],
    *,
    seed: int | None = None,
    hook: RunHook | None = None,
) -> list[GainRow]:
    known = gain_names(scenario.controller)
    for spec in specs:
        if spec.name not in known:
            raise SweepError(
                f"--sweep {spec.name}: not a gain of the {scenario.controller.kind.value} "
                f"controller (gains: backends, {', '.join(known)})"
            )
    if scenario.controller.kind is ControllerKind.FIXED:
        raise SweepError("--sweep: a fixed controller has no gains; set [controller] kind")
    top = top_tier(scenario)
    combos = list(itertools.product(*(s.values for s in specs)))
    rows: list[GainRow] = []
    for i, combo in enumerate(combos):
        values = tuple((s.name, v) for s, v in zip(specs, combo, strict=True))
        label = " ".join(f"{k}={v:g}" for k, v in values)
        changed = with_gains(scenario, {k: _typed(scenario, k, v) for k, v in values})
        progress = hook(label, i, len(combos)) if hook else None
        result = simulate(changed, seed=seed, on_progress=progress)
        rows.append(GainRow(values, result, score(result, top)))
    return rows


def _typed(scenario: Scenario, name: str, value: float) -> float:
    ctrl = scenario.controller
    config = ctrl.gradient if ctrl.kind is ControllerKind.GRADIENT else ctrl.aimd
    current = getattr(config, name)
    if isinstance(current, int) and not isinstance(current, bool):
        if value != int(value):
            raise SweepError(f"--sweep {name}: must be whole numbers, got {value:g}")
        return int(value)
    return value


def best_gains(rows: Sequence[GainRow]) -> GainRow | None:
    return max(rows, key=lambda r: r.score) if rows else None
