"""Sweeps: the backend count that holds the SLOs, and scores over controller gains."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from sim.compare import compare_controllers, compare_table
from sim.engine.model import Scenario
from sim.plots import plot_backends, plot_compare, plot_gains
from sim.sweep import (
    SweepError,
    best_gains,
    parse_sweep,
    pick_backends,
    sweep_backends,
    sweep_gains,
)

from .helpers import shipped

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_parse_sweep_specs() -> None:
    assert parse_sweep("backends=1..4").values == (1, 2, 3, 4)
    assert parse_sweep("decrease_factor=0.5..0.7:0.1").values == (0.5, 0.6, 0.7)
    assert parse_sweep("increase_step=1, 2,4").values == (1, 2, 4)
    for bad in ("backends", "backends=", "backends=4..1", "x=a,b"):
        with pytest.raises(SweepError):
            parse_sweep(bad)


def _short_spike() -> Scenario:
    scenario = shipped("spike")
    return replace(
        scenario, duration_s=60.0, spikes=(replace(scenario.spikes[0], at_s=20.0, duration_s=20.0),)
    )


def test_backend_sweep_picks_the_smallest_count_that_holds(tmp_path: Path) -> None:
    scenario = replace(shipped("steady"), duration_s=20.0)
    scenario = replace(
        scenario,
        tiers=tuple(
            replace(t, arrivals=replace(t.arrivals, rate_rps=t.arrivals.rate_rps / 20))
            for t in scenario.tiers
        ),
    )
    rows = sweep_backends(scenario, parse_sweep("backends=1..3"))
    assert [r.count for r in rows] == [1, 2, 3]
    chosen = pick_backends(rows)
    assert chosen is not None
    assert all(not r.holds for r in rows if r.count < chosen.count)
    assert chosen.holds and not chosen.failures
    assert plot_backends(rows, tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC


def test_gain_sweep_scores_every_combination(tmp_path: Path) -> None:
    scenario = _short_spike()
    rows = sweep_gains(
        scenario,
        [parse_sweep("increase_step=1,4"), parse_sweep("decrease_factor=0.5,0.9")],
    )
    assert len(rows) == 4
    assert {r.values for r in rows} == {
        (("increase_step", a), ("decrease_factor", b)) for a in (1, 4) for b in (0.5, 0.9)
    }
    best = best_gains(rows)
    assert best is not None and best.score == max(r.score for r in rows)
    assert plot_gains(rows, tmp_path / "g.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(SweepError, match="not a gain"):
        sweep_gains(scenario, [parse_sweep("warp_speed=1")])


def test_four_controllers_side_by_side(tmp_path: Path) -> None:
    results = compare_controllers(_short_spike())
    assert [r.controller for r in results] == [
        "aimd-rate",
        "aimd-window",
        "fixed-window",
        "gradient-window",
    ]
    assert len({r.requests for r in results}) == 1  # the same arrivals for each
    table = compare_table(_short_spike(), results)
    assert all(r.controller in table for r in results)
    assert plot_compare(results, tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC
