"""Arrival processes: rates, spikes, the diurnal curve, trace replay, sizes and key skew."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sim.engine.arrivals import ArrivalRow, RateCurve, TierArrivals
from sim.engine.model import (
    Arrivals,
    Diurnal,
    Process,
    SizeDist,
    SizeKind,
    Spike,
    TierSpec,
    TraceRecord,
)
from sim.scenario import parse_scenario


def tier(rate: float, **changes: object) -> TierSpec:
    spec = TierSpec("t", 1.0, 1.0, 10, 1.0, Arrivals(rate_rps=rate), keys=100, key_skew=1.0)
    from dataclasses import replace

    return replace(spec, **changes)  # type: ignore[arg-type]


def rows(source: TierArrivals, end: float) -> list[ArrivalRow]:
    out: list[ArrivalRow] = []
    t = 0.0
    while t < end:
        t = min(end, t + 1.0)
        source.until(t, out)
    return out


def test_poisson_rate_and_spike_factor() -> None:
    spike = Spike(100.0, 100.0, 3.0)
    source = TierArrivals(0, tier(50.0), spikes=(spike,), diurnal=None, duration_s=300, seed=1)
    got = rows(source, 300)
    times = [r[0] for r in got]
    assert times == sorted(times)
    base = sum(1 for t in times if t < 100) / 100
    peak = sum(1 for t in times if 100 <= t < 200) / 100
    assert base == pytest.approx(50, rel=0.1)
    assert peak == pytest.approx(150, rel=0.1)
    assert max(times) < 300


def test_diurnal_curve_is_followed_and_wraps() -> None:
    curve = RateCurve(10.0, (), Diurnal(((0.0, 0.0), (50.0, 2.0)), period_s=100.0))
    end, rate, slope, peak = curve.segment(25.0)
    assert (end, rate, peak) == (50.0, 10.0, 20.0) and slope == pytest.approx(0.4)
    end, rate, _, _ = curve.segment(75.0)  # from 2.0 at 50 back down to 0.0 at 100
    assert end == 100.0 and rate == pytest.approx(10.0)
    diurnal = Diurnal(((0.0, 0.2), (500.0, 1.8)), period_s=1000.0)
    source = TierArrivals(0, tier(100.0), spikes=(), diurnal=diurnal, duration_s=1000, seed=2)
    times = [r[0] for r in rows(source, 1000)]
    low = sum(1 for t in times if t < 100)
    high = sum(1 for t in times if 450 <= t < 550)
    assert high > 4 * low
    assert len(times) == pytest.approx(100_000, rel=0.05)


def test_sizes_are_clamped_and_keys_skewed() -> None:
    spec = tier(
        200.0,
        prompt_tokens=SizeDist(SizeKind.LOGNORMAL, 500, 1.0, 10, 2000),
        output_tokens=SizeDist(SizeKind.FIXED, 64),
        key_skew=1.5,
    )
    got = rows(TierArrivals(0, spec, spikes=(), diurnal=None, duration_s=50, seed=3), 50)
    prompts = [r[3] for r in got]
    assert min(prompts) >= 10 and max(prompts) <= 2000
    assert sum(prompts) / len(prompts) == pytest.approx(500, rel=0.1)
    assert {r[4] for r in got} == {64}
    keys = [r[2] for r in got]
    assert keys.count(0) > 10 * max(1, keys.count(50))


def test_trace_replay_keeps_times_keys_and_sizes() -> None:
    trace = (
        TraceRecord(0.5, "alice", 10, 5),
        TraceRecord(1.5, None, None, 7),
        TraceRecord(9, "bob"),
    )
    spec = tier(0.0, arrivals=Arrivals(Process.TRACE, 0.0, trace))
    source = TierArrivals(0, spec, spikes=(), diurnal=None, duration_s=5, seed=1)
    got = rows(source, 5)
    assert [r[0] for r in got] == [0.5, 1.5]  # the third is past the duration
    assert source.key_names[got[0][2]] == "alice"
    assert got[0][3:] == (10, 5) and got[1][4] == 7


def test_trace_csv_from_a_scenario(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("at_s,key,prompt_tokens,output_tokens\n0.1,a,5,5\n0.2,,,\n")
    text = """
duration_s = 1
[backends]
count = 1
[[tiers]]
name = "x"
weight = 1
max_wait_s = 1
slo_latency_s = 1
process = "trace"
trace = "t.csv"
"""
    scenario = parse_scenario(text, base_dir=tmp_path)
    records = scenario.tiers[0].arrivals.trace
    assert [r.at_s for r in records] == [0.1, 0.2]
    assert records[0].key == "a" and records[1].key is None and records[1].prompt_tokens is None
    assert math.isclose(sum(r.at_s for r in records), 0.3)
