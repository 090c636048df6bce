"""Health-driven quotas: a quota that shrinks while the backends are congested.

The seed's "reduce quotas automatically when p95 latency exceeds a threshold": a tier may set
`congested_factor` (0 < f <= 1) on its quota, and while the controller reports congestion (its
latency signal over target, backend pressure over threshold, or backend drops in its last
tick) each of the tier's limits is that fraction of itself. The controller already decides
congestion once per tick from those signals; this only turns it into the limit a request is
checked against, so the quota follows the same decision that sheds `shed_on_overload` tiers,
with no threshold of its own to tune. Off by default (a factor of 1).

Why floor, at least 1: a scaled quota must never admit more than the factor allows, and a
quota that exists must not scale to 0, which means "no such quota" (unlimited) everywhere else.
"""

from __future__ import annotations

import math


def quota_factor(configured: float, *, congested: bool) -> float:
    """The factor on a quota now: the tier's `congested_factor` while congested, else 1."""
    if not 0 < configured <= 1:
        raise ValueError(f"congested_factor must be in (0, 1], got {configured}")
    return configured if congested else 1.0


def scaled_limit(limit: int, factor: float) -> int:
    """`limit` under `factor`: rounded down, at least 1; a limit of 0 (none) stays 0."""
    if limit <= 0 or factor >= 1:
        return limit
    return max(1, math.floor(limit * factor))
