"""The README's promises checked against the code: its config example loads and names every
field the config file takes, CI runs exactly its test command, and its engine configs read
their engines' metrics."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from backends.http.client import BackendLimits
from scheduler.core import AIMDConfig
from scheduler.models.exposition import Exporter, parse_scrape
from scheduler.models.gpu import GpuConfig
from scheduler.models.pressure import PressureConfig
from scheduler.models.pressure_config import ProbeConfig
from scheduler.service.config import ServerSettings, load_settings
from tests.backends.test_pressure import SGLANG, TGI, VLLM_V1

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_readme_config_example_is_valid(tmp_path: Path) -> None:
    match = re.search(r"### Configuration.*?```toml\n(.*?)```", README, re.S)
    assert match is not None
    path = tmp_path / "readme.toml"
    path.write_text(match.group(1))
    settings = load_settings(path, env={"ACME_KEY": "sk-acme"})
    assert settings.keys[0].tenant == "acme"


def test_every_field_the_config_takes_is_in_the_readme() -> None:
    # `controller.burst_s`, `tiers.T.serve_stale`, `demo_backend.max_waiting` and four of the
    # pressure probe's fields were read from the file but named nowhere in the README
    source = (ROOT / "scheduler" / "service" / "config.py").read_text()
    names = set(re.findall(r'\.get\(\s*"([a-z_]+)"', source))  # read by name (`Table.get`)
    for whole in (AIMDConfig, ServerSettings, BackendLimits, GpuConfig):  # field by field
        names |= {f.name for f in dataclasses.fields(whole)}
    for probe in (ProbeConfig, PressureConfig):  # `[models.M.pressure]`
        names |= {f.name for f in dataclasses.fields(probe)}
    assert len(names) > 80
    missing = sorted(n for n in names if not re.search(rf"\b{n}\b", README))
    assert missing == []


def test_every_admin_route_is_in_the_readme() -> None:
    # `GET /admin/v1/keys/{key_id}` was served but not listed
    source = (ROOT / "scheduler" / "service" / "admin.py").read_text()
    routes = re.findall(r'@admin\.(get|post|put|patch|delete)\("([^"]+)"\)', source)
    assert len(routes) > 10
    placeholder = re.compile(r"<(?:\w+:)?(\w+)>")  # quart's <key_id>: the README's {key_id}
    listed = {m.upper() + " /admin/v1" + placeholder.sub(r"{\1}", p) for m, p in routes}
    assert sorted(r for r in listed if f"`{r}`" not in README and f"`{r} " not in README) == []


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```sh\n# 2\. .*?\n(.*?)\n```", README, re.S)
    assert len(commands) == 1
    assert commands[0] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize(
    ("index", "exporter", "text", "waiting"),
    [
        (0, Exporter.VLLM, VLLM_V1, 5.0),
        (1, Exporter.SGLANG, SGLANG, 5.0),
        (2, Exporter.TGI, TGI, 5.0),
    ],
)
def test_the_readme_engine_configs_read_their_engines_metrics(
    tmp_path: Path, index: int, exporter: Exporter, text: str, waiting: float
) -> None:
    # The vLLM, SGLang and TGI configs of "In front of a real engine" load, name their
    # engine's exporter, and that exporter reads the engine's own exposition text.
    section = README.split("The other engines are configured", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    path = tmp_path / "engine.toml"
    path.write_text(blocks[index])
    (model,) = load_settings(path, env={}).models
    assert model.pressure.exporters == frozenset({exporter})
    assert model.pressure.url_for(model.backends[0]) == model.backends[0] + "/metrics"
    scrape = parse_scrape(text, at=0.0, exporters=model.pressure.exporters)
    assert scrape.waiting == waiting
