"""Scenarios from TOML: the shipped ones load, `spike.toml` shows every field, and a bad one
names its field and line."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from scheduler.core import AIMDConfig, GateMode
from scheduler.core.gradient import GradientConfig
from sim.engine.model import ControllerKind, Process, SizeKind
from sim.scenario import ScenarioError, bundled_scenarios, load_scenario, parse_scenario

from .helpers import SMALL

MINIMAL = """
duration_s = 10

[backends]
count = 2

[[tiers]]
name = "a"
weight = 1
max_wait_s = 1
slo_latency_s = 2
rate_rps = 1
"""


def test_shipped_scenarios_load_by_path_and_name() -> None:
    names = set(bundled_scenarios())
    assert {"steady", "spike", "capacity_loss", "noisy_tenant"} <= names
    for name in names:
        scenario = load_scenario(name)
        assert scenario.name == name
        assert scenario.tiers and scenario.backends.count >= 1


def test_spike_shows_every_field_a_scenario_takes() -> None:
    # it says it documents the format, every field with a comment; eight were missing
    # (latency_signal, smoothing, long_window_ticks, min, serve_stale, tenants and the
    # tenant and model quotas)
    source = (Path(__file__).parents[2] / "sim" / "scenario.py").read_text()
    names = set(
        re.findall(r'\.(?:number|integer|flag|text|names|table|tables|has)\(\s*"(\w+)"', source)
    )
    for config in (AIMDConfig, GradientConfig):  # read by their field names
        names |= {f.name for f in dataclasses.fields(config)}
    assert len(names) > 60
    spike = bundled_scenarios()["spike"].read_text()
    assert sorted(n for n in names if not re.search(rf"\b{n}\b", spike)) == []


def test_fields_are_read_into_the_model() -> None:
    scenario = parse_scenario(SMALL)
    assert scenario.duration_s == 40 and scenario.seed == 3
    free = scenario.tier("free")
    assert free.shed_on_overload and free.quota is not None and free.quota.limit == 3
    assert free.prompt_tokens.kind is SizeKind.FIXED and free.prompt_tokens.mean == 50
    enterprise = scenario.tier("enterprise")
    assert enterprise.output_tokens.kind is SizeKind.UNIFORM
    assert enterprise.arrivals.process is Process.POISSON
    assert scenario.controller.kind is ControllerKind.AIMD
    assert scenario.controller.mode is GateMode.WINDOW
    assert scenario.controller.aimd.target_latency_s == 2.0
    assert scenario.capacity_events[0].restore_at_s == 25
    assert scenario.fallback is not None and scenario.fallback.gpu.max_batch == 4


def _error(text: str) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, source="bad.toml")
    return info.value


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    ("old", "new", "field", "words"),
    [
        ("weight = 1", "weight = -1", "tiers[0].weight", "> 0"),
        ("rate_rps = 1", 'rate_rps = "fast"', "tiers[0].rate_rps", "number"),
        ("count = 2", "count = 2\nmax_batch = 0", "backends.max_batch", ">= 1"),
        ("max_wait_s = 1", "max_wait_s = 1\nmax_wiat_s = 3", "tiers[0].max_wiat_s", "unknown"),
        (
            "duration_s = 10",
            "duration_s = 10\n[controller]\ndecrease_factor = 1.5",
            "controller.decrease_factor",
            "(0, 1)",
        ),
        (
            "duration_s = 10",
            'duration_s = 10\n[controller]\nmode = "both"',
            "controller.mode",
            "window",
        ),
    ],
)
def test_a_bad_field_is_named_with_its_line(old: str, new: str, field: str, words: str) -> None:
    text = MINIMAL.replace(old, new)
    error = _error(text)
    assert error.field == field
    assert words in error.message
    assert error.line == _line_of(text, field.rsplit(".", 1)[-1].split("[")[0] + " =")
    assert str(error).startswith(f"bad.toml:{error.line}: {field}: ")


def test_a_field_in_a_second_array_table_and_a_sub_table() -> None:
    text = SMALL.replace("limit = 3", "limit = 0")
    error = _error(text)
    assert error.field == "tiers[1].quota.limit"
    assert error.line == _line_of(text, "limit = 0")
    text = SMALL.replace('name = "free"', 'name = "enterprise"')
    error = _error(text)
    assert error.field == "tiers[1].name" and "duplicate" in error.message
    assert error.line == _line_of(text, 'name = "enterprise"') + 0 or error.line is not None


def test_missing_sections_and_syntax_errors() -> None:
    assert _error("duration_s = 1\n").field == "tiers"
    error = _error("duration_s = 1\n[[tiers]]\nname = 'a'\nweight = 1\nmax_wait_s = 1\n")
    assert error.field in {"tiers[0].slo_latency_s", "tiers[0].rate_rps"}
    assert error.line == 2  # the [[tiers]] header: the field is missing, its table is here
    error = _error("duration_s = 1\nname = = 2\n")
    assert error.field == "toml" and error.line == 2


def test_cross_references_are_checked() -> None:
    error = _error(MINIMAL + "\n[[spikes]]\nat_s = 1\nduration_s = 1\nfactor = 2\ntiers = ['b']\n")
    assert error.field == "spikes[0].tiers" and "unknown tier 'b'" in error.message
    error = _error(MINIMAL + "\n[[capacity_events]]\nat_s = 1\nbackends = 3\n")
    assert error.field == "capacity_events[0].backends"
    error = _error(MINIMAL.replace('name = "a"', 'name = "a"\nladder = ["cache", "teleport"]'))
    assert error.field == "tiers[0].ladder" and "teleport" in error.message


def test_unreadable_file_and_bad_trace(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.toml")
    # a shipped scenario's name mistyped: it was "cannot read: [Errno 2] No such file"
    with pytest.raises(ScenarioError, match=r"nor a shipped scenario .*did you mean 'spike'"):
        load_scenario("spkie")
    (tmp_path / "t.csv").write_text("at_s\n0.5\nsoon\n")
    scenario_file = tmp_path / "s.toml"
    scenario_file.write_text(MINIMAL.replace("rate_rps = 1", 'process = "trace"\ntrace = "t.csv"'))
    with pytest.raises(ScenarioError) as info:
        load_scenario(scenario_file)
    assert info.value.field == "tiers[0].trace" and "t.csv:3" in info.value.message
