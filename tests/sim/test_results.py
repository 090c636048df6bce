"""Result arithmetic: percentiles (with zeros kept apart), Jain's index, oscillation, lines."""

from __future__ import annotations

import math
from array import array

import pytest

from sim.engine.results import Percentiles, jain_index, percentile
from sim.toml_lines import FieldLines


def test_percentiles_count_the_zeros_kept_apart() -> None:
    values = array("d", [5.0, 1.0, 3.0])
    assert Percentiles.of(values) == Percentiles(3.0, 5.0, 5.0)
    with_zeros = Percentiles.of(values, zeros=97)  # 97 zeros, then 1, 3, 5
    assert with_zeros == Percentiles(0.0, 0.0, 3.0)
    assert Percentiles.of(array("d", list(range(1, 101))), zeros=0).p99 == 99
    empty = Percentiles.of([])
    assert math.isnan(empty.p50) and math.isnan(empty.p99)
    assert math.isnan(percentile([], 0.5))


def test_jain_index_bounds() -> None:
    assert jain_index([1.0, 1.0, 1.0]) == 1.0
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert jain_index([0.0, 0.0]) == 1.0
    assert math.isnan(jain_index([]))


def test_field_lines_for_tables_arrays_and_inline_keys() -> None:
    text = "\n".join(
        [
            "name = 'x'",  # 1
            "[backends]",  # 2
            "count = 2",  # 3
            "[[tiers]]",  # 4
            "name = 'a'",  # 5
            "[[tiers]]",  # 6
            "name = 'b'",  # 7
            "prompt_tokens = { mean = 3 }",  # 8
            "[tiers.quota]",  # 9
            "limit = 1",  # 10
            "[[tiers.spikes]]",  # 11
            "at_s = 1",  # 12
        ]
    )
    lines = FieldLines(text)
    assert lines.line_of("name") == 1
    assert lines.line_of("backends.count") == 3
    assert lines.line_of("tiers[0].name") == 5
    assert lines.line_of("tiers[1].name") == 7
    assert lines.line_of("tiers[1].prompt_tokens.mean") == 8
    assert lines.line_of("tiers[1].quota.limit") == 10
    assert lines.line_of("tiers[1].quota.burst") == 9
    assert lines.line_of("tiers[1].spikes[0].at_s") == 12
    assert lines.line_of("nowhere.at.all") is None
