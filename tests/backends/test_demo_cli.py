"""`scheduler demo-backend --help`: its own name, and a line of help for every option."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from scheduler.models.gpu import GpuConfig

SCHEDULER = str(Path(sys.executable).parent / "scheduler")


def help_text(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_help_names_scheduler_demo_backend() -> None:
    assert help_text(SCHEDULER, "demo-backend", "--help").startswith(
        "usage: scheduler demo-backend "
    )
    assert help_text(sys.executable, "-m", "backends.demo.server", "--help").startswith(
        "usage: python -m backends.demo.server "
    )


def test_every_option_has_help_with_its_default() -> None:
    text = help_text(SCHEDULER, "demo-backend", "--help")
    options = text.split("options:")[1]
    # one entry per option: "  --name [METAVAR]  help..." (the help may start on the next line)
    entries = re.split(r"\n  (?=--)", options.split("\n", 2)[2])
    assert len(entries) == 5 + len(dataclasses.fields(GpuConfig))  # the GPU's, and 5 more
    for entry in entries:
        name, _, rest = entry.strip().partition(" ")
        words = rest.split()
        assert len(words) >= 3, f"{name} has no help: {entry!r}"
        assert "(default" in entry or "repeatable" in entry, entry
