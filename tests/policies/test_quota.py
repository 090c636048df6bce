from __future__ import annotations

import dataclasses
import math

import pytest

from policies.ratelimit import GCRA, Quota, SlidingWindowCounter, SlidingWindowLog


def test_burst_defaults_to_limit_and_period_is_float() -> None:
    quota = Quota(limit=10, period_s=60)
    assert quota.burst == 10
    assert isinstance(quota.period_s, float)
    assert Quota(10, 60.0, 3).burst == 3


def test_quota_is_a_frozen_value() -> None:
    quota = Quota(limit=5, period_s=1.0)
    assert quota == Quota(5, 1.0, 5)
    assert hash(quota) == hash(Quota(5, 1.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        quota.limit = 6  # type: ignore[misc]
    assert dataclasses.replace(quota, burst=2) == Quota(5, 1.0, 2)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"limit": 0, "period_s": 1.0}, "quota.limit"),
        ({"limit": -3, "period_s": 1.0}, "quota.limit"),
        ({"limit": 2.5, "period_s": 1.0}, "quota.limit"),
        ({"limit": True, "period_s": 1.0}, "quota.limit"),
        ({"limit": 1, "period_s": 0}, "quota.period_s must be > 0, got 0"),
        ({"limit": 1, "period_s": -1.0}, "quota.period_s"),
        ({"limit": 1, "period_s": math.inf}, "quota.period_s"),
        ({"limit": 1, "period_s": math.nan}, "quota.period_s"),
        ({"limit": 1, "period_s": "60"}, "quota.period_s"),
        ({"limit": 1, "period_s": 1.0, "burst": 0}, "quota.burst"),
        ({"limit": 1, "period_s": 1.0, "burst": 1.5}, "quota.burst"),
    ],
)
def test_bad_quota_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Quota(**kwargs)  # type: ignore[arg-type]


def test_per_replica_rounds_up() -> None:
    assert Quota(10, 60.0, 4).per_replica(3) == Quota(4, 60.0, 2)
    assert Quota(1, 1.0).per_replica(8) == Quota(1, 1.0, 1)
    with pytest.raises(ValueError, match="replicas"):
        Quota(1, 1.0).per_replica(0)


@pytest.mark.parametrize("factory", [GCRA, SlidingWindowLog, SlidingWindowCounter])
def test_bad_calls_raise(factory: type[GCRA | SlidingWindowLog | SlidingWindowCounter]) -> None:
    algorithm = factory(Quota(3, 1.0))
    with pytest.raises(ValueError, match="cost"):
        algorithm.take(None, now=0.0, cost=-1)
    with pytest.raises(ValueError, match="cost"):
        algorithm.refund(None, now=0.0, cost=-1)
    with pytest.raises(ValueError, match="now"):
        algorithm.take(None, now=math.nan)
    with pytest.raises(ValueError, match="now"):
        algorithm.take(None, now=math.inf)
