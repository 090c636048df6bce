"""The README's promises checked against the code: its config example loads, and CI runs
exactly its test command."""

from __future__ import annotations

import re
from pathlib import Path

from scheduler.service.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_readme_config_example_is_valid(tmp_path: Path) -> None:
    match = re.search(r"### Configuration.*?```toml\n(.*?)```", README, re.S)
    assert match is not None
    path = tmp_path / "readme.toml"
    path.write_text(match.group(1))
    settings = load_settings(path, env={"ACME_KEY": "sk-acme"})
    assert settings.keys[0].tenant == "acme"


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```sh\n# 2\. .*?\n(.*?)\n```", README, re.S)
    assert len(commands) == 1
    assert commands[0] in (ROOT / ".ci" / "run").read_text()
