"""The command line: a run writes its report and plots; a bad scenario exits 2 naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
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


# ---- `scheduler sim` as a command: progress where nobody watches a terminal -------------------

SCHEDULER = str(Path(sys.executable).parent / "scheduler")


def run_sim(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Bytes decoded by hand: text mode would turn the bar's \r into newlines."""
    scenario = tmp_path / "small.toml"
    scenario.write_text(SMALL)
    command = [SCHEDULER, "sim", str(scenario), *args]
    result = subprocess.run(command, capture_output=True, timeout=60)
    return subprocess.CompletedProcess(
        command, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def test_a_run_in_a_pipe_shows_progress_lines(tmp_path: Path) -> None:
    """`scheduler sim steady` ran 97 s with nothing on a pipe: the bar was for terminals only."""
    result = run_sim(tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "\r" not in result.stderr  # lines, not a bar redrawn in place
    assert [line.split(" (")[0] for line in lines] == [f"small: {p}%" for p in range(0, 101, 10)]
    assert "enterprise" in result.stdout


def test_no_progress_is_quiet_and_progress_forces_the_bar(tmp_path: Path) -> None:
    quiet = run_sim(tmp_path, "--no-progress")
    assert quiet.returncode == 0 and quiet.stderr == ""
    bar = run_sim(tmp_path, "--progress")
    assert bar.returncode == 0 and "\r[" in bar.stderr and "100% small" in bar.stderr


def test_the_help_names_the_command_it_was_called_as() -> None:
    for command, usage in [
        ([SCHEDULER, "sim", "--help"], "usage: scheduler sim "),
        ([sys.executable, "-m", "sim", "--help"], "usage: python -m sim "),
    ]:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and result.stdout.startswith(usage), result.stdout
