"""The command line: a run writes its report and plots; a bad scenario exits 2 naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim.cli import main

from .helpers import SMALL


def test_run_writes_report_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = tmp_path / "small.toml"
    scenario.write_text(SMALL.replace("duration_s = 40", "duration_s = 10"))
    out = tmp_path / "out"
    assert main([str(scenario), "--out", str(out), "--seed", "5", "--progress"]) == 0
    captured = capsys.readouterr()
    assert "enterprise" in captured.out and "wrote" in captured.out
    assert "100%" in captured.err  # the progress bar
    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 5
    assert {p.name for p in out.glob("*.png")} == {
        "offered_admitted.png",
        "controller.png",
        "queue_depth.png",
    }


def test_bad_scenario_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "bad.toml"
    scenario.write_text(SMALL.replace("weight = 8", "weight = 0"))
    assert main([str(scenario)]) == 2
    err = capsys.readouterr().err
    assert "tiers[0].weight" in err and "bad.toml:" in err


def test_bad_sweep_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["spike", "--sweep", "backends=oops"]) == 2
    assert "--sweep backends" in capsys.readouterr().err
