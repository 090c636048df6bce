"""Reports of a run: the per-tier table for people, and JSON for machines.

The JSON's top-level keys (`REPORT_KEYS`) and per-tier keys (`TIER_KEYS`) are a contract:
tests check them, and other tools may read them. Non-finite numbers (a percentile of no
samples, a tier never shed) are written as `null`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sim.engine.results import Percentiles, SimResult, TierResult

REPORT_KEYS = (
    "scenario",
    "seed",
    "controller",
    "duration_s",
    "ended_at",
    "requests",
    "events",
    "capacity_rps",
    "goodput",
    "goodput_ratio",
    "limit",
    "tiers",
    "spikes",
    "timeseries",
)
TIER_KEYS = (
    "name",
    "slo_latency_s",
    "offered",
    "admitted",
    "completed",
    "served_from_cache",
    "degraded_to_fallback",
    "refused_by_quota",
    "shed",
    "dropped",
    "goodput",
    "goodput_ratio",
    "shed_ratio",
    "shed_reasons",
    "latency_s",
    "queue_wait_s",
    "shed_wait_s",
    "fairness",
    "first_shed_at",
)


def clean(value: Any) -> Any:
    """`value` with nan and infinities replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def _percentiles(p: Percentiles) -> dict[str, float]:
    return {"p50": p.p50, "p95": p.p95, "p99": p.p99}


def tier_json(t: TierResult) -> dict[str, Any]:
    return {
        "name": t.name,
        "slo_latency_s": t.slo_latency_s,
        "offered": t.offered,
        "admitted": t.admitted,
        "completed": t.completed,
        "served_from_cache": t.served_from_cache,
        "degraded_to_fallback": t.degraded_to_fallback,
        "refused_by_quota": t.refused_by_quota,
        "shed": t.shed,
        "dropped": t.dropped,
        "goodput": t.goodput,
        "goodput_ratio": t.goodput_ratio,
        "shed_ratio": t.shed_ratio,
        "shed_reasons": t.shed_reasons,
        "latency_s": _percentiles(t.latency_s),
        "queue_wait_s": _percentiles(t.queue_wait_s),
        "shed_wait_s": _percentiles(t.shed_wait_s),
        "fairness": t.fairness,
        "first_shed_at": t.first_shed_at,
    }


def result_json(r: SimResult, *, wall_s: float | None = None) -> dict[str, Any]:
    """Everything a run measured, as plain JSON-ready values."""
    s = r.series
    report: dict[str, Any] = {
        "scenario": r.scenario,
        "seed": r.seed,
        "controller": r.controller,
        "duration_s": r.duration_s,
        "ended_at": r.ended_at,
        "requests": r.requests,
        "events": r.events,
        "capacity_rps": r.capacity_rps,
        "goodput": r.goodput,
        "goodput_ratio": r.goodput_ratio,
        "limit": {
            "increases": r.limit_increases,
            "decreases": r.limit_decreases,
            "oscillation": r.limit_oscillation(),
            "replicas": list(r.replica_limits),
        },
        "utilization_under_demand": None if math.isnan(r.utilization) else r.utilization,
        "tiers": [tier_json(t) for t in r.tiers],
        "spikes": [
            {
                "at_s": sp.at_s,
                "end_s": sp.end_s,
                "offered_rps": sp.offered_rps,
                "goodput_rps": sp.goodput_rps,
                "capacity_rps": sp.capacity_rps,
                "goodput_vs_capacity": sp.goodput_vs_capacity,
            }
            for sp in r.spikes
        ],
        "timeseries": {
            "sample_s": s.sample_s,
            "t": s.t,
            "limit": s.limit,
            "pressure": s.pressure,
            "latency_signal_s": s.latency_signal_s,
            "p99_latency_s": s.p99_latency_s,
            "inflight": s.inflight,
            "backends_alive": s.backends_alive,
            "offered": s.offered,
            "admitted": s.admitted,
            "goodput": s.goodput,
            "shed": s.shed,
            "depth": s.depth,
        },
    }
    if wall_s is not None:
        report["wall_s"] = wall_s
        report["simulated_requests_per_s"] = r.requests / wall_s if wall_s > 0 else None
    cleaned: dict[str, Any] = clean(report)
    return cleaned


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(value), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [list(headers)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "never" if value > 0 else "-inf"
        return f"{value:.2f}"
    return str(value)


def _triple(p: Percentiles) -> str:
    return "/".join("-" if math.isnan(v) else f"{v:.2f}" for v in (p.p50, p.p95, p.p99))


def _pair(p: Percentiles) -> str:
    return "/".join("-" if math.isnan(v) else f"{v:.2f}" for v in (p.p50, p.p95))


TIER_HEADERS = (
    "tier",
    "offered",
    "admitted",
    "cache",
    "fallback",
    "quota",
    "shed",
    "dropped",
    "goodput",
    "good%",
    "latency p50/p95/p99 s",
    "wait p50/p95/p99 s",
    "shed after p50/p95 s",
    "jain",
)


def tier_table(r: SimResult) -> str:
    """The per-tier table: outcomes, goodput, latency and queue wait, fairness."""
    rows = [
        (
            t.name,
            t.offered,
            t.admitted,
            t.served_from_cache,
            t.degraded_to_fallback,
            t.refused_by_quota,
            t.shed,
            t.dropped,
            t.goodput,
            f"{100 * t.goodput_ratio:.1f}",
            _triple(t.latency_s),
            _triple(t.queue_wait_s),
            _pair(t.shed_wait_s),
            f"{t.fairness:.3f}" if not math.isnan(t.fairness) else "-",
        )
        for t in r.tiers
    ]
    return format_table(TIER_HEADERS, rows)


def summary(r: SimResult, *, wall_s: float | None = None) -> str:
    """The header, the tier table and the spike lines of one run."""
    head = (
        f"scenario {r.scenario}  seed {r.seed}  controller {r.controller}  "
        f"{r.requests:,} requests  capacity {r.capacity_rps:.1f} req/s  "
        f"goodput {100 * r.goodput_ratio:.1f}%"
    )
    if wall_s is not None and wall_s > 0:
        head += f"  wall {wall_s:.2f} s ({r.requests / wall_s:,.0f} req/s)"
    lines = [head, tier_table(r)]
    for sp in r.spikes:
        lines.append(
            f"spike {sp.at_s:g}-{sp.end_s:g} s: offered {sp.offered_rps:.1f} req/s, "
            f"goodput {sp.goodput_rps:.1f} req/s = {100 * sp.goodput_vs_capacity:.1f}% of "
            f"capacity ({sp.capacity_rps:.1f} req/s)"
        )
    order = sorted(
        (t for t in r.tiers if math.isfinite(t.first_shed_at)), key=lambda t: t.first_shed_at
    )
    if order:
        lines.append(
            "first shed: " + ", ".join(f"{t.name} at {t.first_shed_at:.1f} s" for t in order)
        )
    return "\n".join(lines)
