"""PNG plots of a run, a sweep and a comparison (matplotlib's Agg canvas, no pyplot state).

matplotlib is imported inside each function: a run without plots never pays for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sim.engine import SimResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from sim.sweep import BackendRow, GainRow


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_run(result: SimResult, out_dir: Path, *, prefix: str = "") -> list[Path]:
    """Offered vs admitted per tier, the controller's limit against pressure and latency,
    and queue depth per tier."""
    return [
        _offered_admitted(result, out_dir / f"{prefix}offered_admitted.png"),
        _controller(result, out_dir / f"{prefix}controller.png"),
        _queue_depth(result, out_dir / f"{prefix}queue_depth.png"),
    ]


def _per_second(counts: list[int], step: float) -> list[float]:
    return [c / step for c in counts]


def _offered_admitted(r: SimResult, path: Path) -> Path:
    s = r.series
    names = list(s.offered)
    fig = _figure(9, 2.2 * len(names) + 0.6)
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names, strict=True):
        ax.plot(s.t, _per_second(s.offered[name], s.sample_s), label="offered", lw=1)
        ax.plot(s.t, _per_second(s.admitted[name], s.sample_s), label="admitted", lw=1)
        ax.plot(s.t, _per_second(s.goodput[name], s.sample_s), label="goodput", lw=1, ls="--")
        ax.set_ylabel(f"{name}\nreq/s")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize="small")
    axes[0].set_title(f"{r.scenario}: offered vs admitted per tier ({r.controller})")
    axes[-1].set_xlabel("virtual time (s)")
    return _save(fig, path)


def _controller(r: SimResult, path: Path) -> Path:
    s = r.series
    fig = _figure(9, 7)
    limit_ax, pressure_ax, latency_ax = fig.subplots(3, 1, sharex=True)
    limit_ax.plot(s.t, s.limit, color="tab:blue", lw=1, label="limit")
    limit_ax.plot(s.t, s.inflight, color="tab:gray", lw=0.8, label="in flight")
    limit_ax.set_ylabel("limit")
    limit_ax.legend(loc="upper right", fontsize="small")
    limit_ax.set_title(f"{r.scenario}: the controller's limit against pressure and latency")
    pressure_ax.plot(s.t, s.pressure, color="tab:red", lw=1)
    pressure_ax.set_ylabel("pressure (0..1)")
    pressure_ax.set_ylim(-0.02, 1.05)
    latency_ax.plot(s.t, _nan_safe(s.latency_signal_s), lw=1, label="controller's signal")
    latency_ax.plot(s.t, _nan_safe(s.p99_latency_s), lw=1, label="p99 end to end")
    latency_ax.set_ylabel("latency (s)")
    latency_ax.set_xlabel("virtual time (s)")
    latency_ax.legend(loc="upper right", fontsize="small")
    for ax in (limit_ax, pressure_ax, latency_ax):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _nan_safe(values: list[float]) -> list[float]:
    return [v if math.isfinite(v) else math.nan for v in values]


def _queue_depth(r: SimResult, path: Path) -> Path:
    s = r.series
    fig = _figure(9, 3.5)
    ax = fig.subplots()
    for name, depth in s.depth.items():
        ax.plot(s.t, depth, lw=1, label=name)
    ax.set_ylabel("queued requests")
    ax.set_xlabel("virtual time (s)")
    ax.set_title(f"{r.scenario}: queue depth per tier")
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_backends(rows: Sequence[BackendRow], path: Path) -> Path:
    """p99 latency over SLO and shed share per tier, across backend counts."""
    counts = [row.count for row in rows]
    names = [t.name for t in rows[0].result.tiers]
    fig = _figure(9, 6)
    p99_ax, shed_ax = fig.subplots(2, 1, sharex=True)
    for name in names:
        tiers = [row.result.tier(name) for row in rows]
        p99_ax.plot(
            counts, [t.latency_s.p99 / t.slo_latency_s for t in tiers], marker="o", label=name
        )
        shed_ax.plot(counts, [100 * t.shed_ratio for t in tiers], marker="o", label=name)
    p99_ax.axhline(1.0, color="black", lw=0.8, ls="--")
    p99_ax.set_ylabel("p99 latency / SLO")
    p99_ax.set_yscale("log")
    p99_ax.legend(fontsize="small")
    p99_ax.set_title("backend count sweep (holds: p99 <= SLO and shed <= budget)")
    shed_ax.set_ylabel("shed (%)")
    shed_ax.set_xlabel("backends")
    for ax in (p99_ax, shed_ax):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_gains(rows: Sequence[GainRow], path: Path) -> Path:
    """A heat map of the score over two gains (a line over one; the first two of more)."""
    names = [k for k, _ in rows[0].values]
    fig = _figure(7.5, 5.5)
    ax = fig.subplots()
    if len(names) == 1:
        ax.plot([r.values[0][1] for r in rows], [r.score for r in rows], marker="o")
        ax.set_xlabel(names[0])
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    else:
        xs = sorted({r.values[0][1] for r in rows})
        ys = sorted({r.values[1][1] for r in rows})
        grid = [[-math.inf] * len(xs) for _ in ys]
        for r in rows:  # with more than two gains, each cell shows its best setting
            i, j = ys.index(r.values[1][1]), xs.index(r.values[0][1])
            grid[i][j] = max(grid[i][j], r.score)
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white", fontsize=8)
        fig.colorbar(image, ax=ax, label="score")
    ax.set_title("controller gains: score (goodput at SLO, top tier p99, oscillation)")
    return _save(fig, path)


def plot_compare(results: Sequence[SimResult], path: Path) -> Path:
    """The four controllers' limits and goodput over time, on the same seed."""
    fig = _figure(9, 6)
    limit_ax, good_ax = fig.subplots(2, 1, sharex=True)
    for r in results:
        s = r.series
        limit_ax.plot(s.t, s.inflight, lw=1, label=r.controller)
        good = [sum(s.goodput[n][i] for n in s.goodput) / s.sample_s for i in range(len(s.t))]
        good_ax.plot(s.t, good, lw=1, label=r.controller)
    limit_ax.set_ylabel("in flight")
    limit_ax.set_title("controllers side by side (same scenario, same seed)")
    limit_ax.legend(fontsize="small")
    good_ax.set_ylabel("goodput (req/s)")
    good_ax.set_xlabel("virtual time (s)")
    if results and results[0].capacity_rps > 0:
        good_ax.axhline(results[0].capacity_rps, color="black", lw=0.8, ls="--")
    for ax in (limit_ax, good_ax):
        ax.grid(alpha=0.3)
    return _save(fig, path)
