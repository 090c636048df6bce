"""The four controllers side by side on the same scenario and seed, so the default gate mode is
chosen by measurement: AIMD in rate mode, AIMD in window mode, a fixed window, Gradient2."""

from __future__ import annotations

import math
from collections.abc import Sequence

from sim.engine import SimResult, simulate
from sim.engine.capacity import mean_sizes, request_time_s
from sim.engine.controllers import standard_variants
from sim.engine.model import ControllerSpec, Scenario
from sim.report import format_table
from sim.sweep import RunHook, score, top_tier


def variants(scenario: Scenario) -> tuple[ControllerSpec, ...]:
    prompt, output = mean_sizes(scenario)
    request_s = request_time_s(scenario.backends.gpu, prompt, output)
    return standard_variants(
        scenario.controller, scenario.backends, request_s=request_s, replicas=scenario.replicas
    )


def compare_controllers(
    scenario: Scenario, *, seed: int | None = None, hook: RunHook | None = None
) -> list[SimResult]:
    specs = variants(scenario)
    results: list[SimResult] = []
    for i, spec in enumerate(specs):
        progress = hook(spec.label, i, len(specs)) if hook else None
        results.append(simulate(scenario, seed=seed, controller=spec, on_progress=progress))
    return results


def best(results: Sequence[SimResult], top: str) -> SimResult:
    return max(results, key=lambda r: score(r, top))


def gate_mode_verdict(results: Sequence[SimResult], top: str) -> str | None:
    """Which gate mode measured better with the same controller (AIMD), if both ran."""
    by_label = {r.controller: r for r in results}
    rate, window = by_label.get("aimd-rate"), by_label.get("aimd-window")
    if rate is None or window is None:
        return None
    rate_score, window_score = score(rate, top), score(window, top)
    mode = "window" if window_score >= rate_score else "rate"
    return (
        f"gate mode by measurement: {mode} "
        f"(AIMD window score {window_score:.3f}, AIMD rate {rate_score:.3f})"
    )


def compare_table(scenario: Scenario, results: Sequence[SimResult]) -> str:
    top = top_tier(scenario)
    lowest = min(scenario.tiers, key=lambda t: t.weight).name
    headers = (
        "controller",
        "goodput%",
        "busy%",
        "spike good/cap%",
        f"{top} good%",
        f"{top} p99 s",
        f"{lowest} shed%",
        "first shed",
        "limit osc",
        "cuts",
        "score",
    )
    rows = []
    for r in results:
        t = r.tier(top)
        spike = f"{100 * min(s.goodput_vs_capacity for s in r.spikes):.1f}" if r.spikes else "-"
        shed_first = sorted(
            (x for x in r.tiers if math.isfinite(x.first_shed_at)), key=lambda x: x.first_shed_at
        )
        rows.append(
            (
                r.controller,
                f"{100 * r.goodput_ratio:.1f}",
                "-" if math.isnan(r.utilization) else f"{100 * r.utilization:.1f}",
                spike,
                f"{100 * t.goodput_ratio:.2f}",
                f"{t.latency_s.p99:.2f} (SLO {t.slo_latency_s:g})",
                f"{100 * r.tier(lowest).shed_ratio:.1f}",
                shed_first[0].name if shed_first else "-",
                f"{r.limit_oscillation():.3f}",
                r.limit_decreases,
                f"{score(r, top):.3f}",
            )
        )
    return format_table(headers, rows)
