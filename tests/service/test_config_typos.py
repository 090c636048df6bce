"""A typo in the config is named as a typo, before the check of the field it failed to set."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.service.config import ConfigError, load_settings

SCHEDULER = str(Path(sys.executable).parent / "scheduler")


def test_scheduler_serve_names_a_backend_typo_as_an_unknown_field(tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text('[models.x]\nbackend = ["http://127.0.0.1:9"]\n')
    result = subprocess.run(
        [SCHEDULER, "serve", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "models.x.backend: unknown field (did you mean 'backends'?)" in result.stderr
    assert "at least one backend" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('backends = ["http://127.0.0.1:9"]\nfallbak = "y"', "models.x.fallbak: unknown field"),
        ("backends = []\nmax_inflght = 2", "models.x.max_inflght: unknown field"),
        ('backends = ["ftp://x"]\nzzz = 1', "models.x.zzz: unknown field"),
    ],
)
def test_an_unknown_model_field_comes_before_the_other_checks(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "typo.toml"
    config.write_text(f"[models.x]\n{text}\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(config, env={})


def test_every_documented_model_field_is_known(tmp_path: Path) -> None:
    config = tmp_path / "full.toml"
    config.write_text(
        "[models.x]\n"
        'backends = ["http://127.0.0.1:9"]\nfallback = "y"\nshared_cache = true\n'
        "cache_fresh_s = 1\ncache_stale_s = 2\nmax_inflight = 3\n[models.x.pressure]\n"
        '[models.y]\nbackends = ["http://127.0.0.1:9"]\n'
    )
    models = {m.name: m for m in load_settings(config, env={}).models}
    assert models["x"].fallback == "y" and models["x"].max_inflight == 3
