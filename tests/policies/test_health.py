"""Health-driven quotas' pure rule (policies.health): the factor only while congested, and a
scaled limit never above what the factor allows, never 0 for a quota that exists."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.health import quota_factor, scaled_limit


def test_the_factor_applies_only_while_congested() -> None:
    assert quota_factor(0.5, congested=True) == 0.5
    assert quota_factor(0.5, congested=False) == 1.0
    assert quota_factor(1.0, congested=True) == 1.0  # the default: off


@pytest.mark.parametrize("factor", [0.0, -0.5, 1.5, math.nan])
def test_a_factor_outside_zero_to_one_is_refused(factor: float) -> None:
    with pytest.raises(ValueError, match="congested_factor"):
        quota_factor(factor, congested=True)


def test_limits_scale_down_rounded_down_and_never_to_zero() -> None:
    assert scaled_limit(10, 0.5) == 5
    assert scaled_limit(9, 0.5) == 4
    assert scaled_limit(1, 0.1) == 1
    assert scaled_limit(0, 0.5) == 0  # no quota stays no quota
    assert scaled_limit(7, 1.0) == 7


@given(
    limit=st.integers(min_value=0, max_value=2**53 - 1),
    factor=st.floats(min_value=1e-9, max_value=1.0),
    lower=st.floats(min_value=1e-9, max_value=1.0),
)
def test_a_scaled_limit_is_within_the_factor_and_monotonic(
    limit: int, factor: float, lower: float
) -> None:
    scaled = scaled_limit(limit, factor)
    assert scaled <= limit
    assert (scaled == 0) == (limit == 0)
    assert scaled <= max(1, limit * factor)
    assert scaled_limit(limit, min(lower, factor)) <= scaled
