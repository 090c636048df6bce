"""Reports: the JSON schema, the per-tier table, and the PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from sim.engine import simulate
from sim.plots import plot_run
from sim.report import REPORT_KEYS, TIER_KEYS, result_json, summary, write_json

from .helpers import small

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_json_has_every_key_and_is_strict_json(tmp_path: Path) -> None:
    result = simulate(small(duration_s=15.0))
    report = result_json(result, wall_s=0.5)
    assert set(REPORT_KEYS) <= set(report)
    for tier in report["tiers"]:
        assert set(TIER_KEYS) <= set(tier)
        assert set(tier["latency_s"]) == {"p50", "p95", "p99"}
    assert set(report["timeseries"]["offered"]) == {"enterprise", "free"}
    path = write_json(tmp_path / "r.json", report)
    loaded = json.loads(path.read_text())  # allow_nan=False wrote no NaN
    assert loaded["requests"] == result.requests
    assert loaded["simulated_requests_per_s"] == result.requests / 0.5


def test_summary_has_a_row_per_tier() -> None:
    result = simulate(small(duration_s=15.0))
    text = summary(result)
    assert "latency p50/p95/p99" in text and "jain" in text
    assert sum(1 for line in text.splitlines() if line.startswith(("enterprise", "free"))) == 2


def test_plots_are_png_files(tmp_path: Path) -> None:
    result = simulate(small(duration_s=10.0))
    paths = plot_run(result, tmp_path)
    assert [p.name for p in paths] == ["offered_admitted.png", "controller.png", "queue_depth.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
