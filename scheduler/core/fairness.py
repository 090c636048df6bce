"""Jain's fairness index of each tier, over the tokens its keys were served in a recent window.

Definition. Over the window (now - window_s, now], for each key of a tier that sent the
scheduler a request (bypass keys excepted): d_k, the tokens it asked for (each request's cost,
as the fair queue charges it, counted when the request left the queue: admitted, or shed), and
x_k, the tokens admitted. The fair share f_k is the max-min fair division of what was served,
S = sum(x), over the demands: f_k = min(d_k, L) with the level L that makes sum(f) = S (water
filling). The index is Jain's over the keys' x_k / f_k:

    J = (sum r_k)^2 / (n * sum r_k^2),   r_k = x_k / f_k,   n keys

J is 1 when every key got its fair share (in particular when every key got all it asked for)
and falls towards 1/n as one key takes the others' share. It is 1 when nothing was served in
the window (no share to divide) and for a single key.

Why normalised by the fair share (as Jain et al. advise, "the optimal allocation"): raw
throughputs differ when demands differ, so a key that sends one request a minute would make a
perfectly fair queue look unfair beside a backlogged neighbour. Max-min fairness is what the
fair queue implements among keys of one tier (equal shares for the backlogged, the rest to
whoever asks), so J < 1 measures the queue's departure from it.

This is a statistic, not a decision: it is told the time and keeps events younger than the
window (one per request that left the queue), so memory follows the request rate.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


def jain_index(values: list[float]) -> float:
    """Jain's index of `values` (>= 0): 1 when all are equal, 1/n when one has everything;
    1 for no values or all zero."""
    total = sum(values)
    squares = sum(v * v for v in values)
    if not values or squares <= 0:
        return 1.0
    return total * total / (len(values) * squares)


def max_min_shares(demands: list[float], supply: float) -> list[float]:
    """The max-min fair division of `supply` over `demands`: each gets min(demand, level),
    the level set so that the shares add up to `supply` (all demands, if it covers them)."""
    shares = [0.0] * len(demands)
    left, waiting = supply, len(demands)
    for i in sorted(range(len(demands)), key=demands.__getitem__):
        level = left / waiting
        shares[i] = min(demands[i], level)
        left -= shares[i]
        waiting -= 1
    return shares


def fair_share_index(demanded: list[float], served: list[float]) -> float:
    """Jain's index of each key's service over its max-min fair share (module docstring)."""
    shares = max_min_shares(demanded, sum(served))
    ratios = [x / f for x, f in zip(served, shares, strict=True) if f > 0]
    return jain_index(ratios)


@dataclass(slots=True)
class _TierWindow:
    events: deque[tuple[float, str, float, float]] = field(default_factory=deque)
    demanded: dict[str, float] = field(default_factory=dict)
    served: dict[str, float] = field(default_factory=dict)
    events_of: dict[str, int] = field(default_factory=dict)  # per key, in the window


class FairnessWindow:
    """Each tier's keys' demanded and served tokens over the last `window_s`, and the index."""

    def __init__(self, window_s: float) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._tiers: dict[str, _TierWindow] = {}

    def record(self, tier: str, key: str, *, cost: float, admitted: bool, now: float) -> None:
        """A request of `key` left `tier`'s queue at `now`: admitted, or shed."""
        window = self._tiers.setdefault(tier, _TierWindow())
        served = cost if admitted else 0.0
        window.events.append((now, key, cost, served))
        window.demanded[key] = window.demanded.get(key, 0.0) + cost
        window.served[key] = window.served.get(key, 0.0) + served
        window.events_of[key] = window.events_of.get(key, 0) + 1
        self._expire(window, now)

    def index(self, tier: str, *, now: float) -> float:
        """Jain's index of `tier` over the window ending at `now` (1 with nothing in it)."""
        window = self._tiers.get(tier)
        if window is None:
            return 1.0
        self._expire(window, now)
        keys = list(window.demanded)
        return fair_share_index(
            [window.demanded[k] for k in keys], [window.served[k] for k in keys]
        )

    def active_keys(self, tier: str, *, now: float) -> int:
        """How many keys of `tier` the index is over."""
        window = self._tiers.get(tier)
        if window is None:
            return 0
        self._expire(window, now)
        return len(window.demanded)

    def _expire(self, window: _TierWindow, now: float) -> None:
        events, since = window.events, now - self.window_s
        while events and events[0][0] <= since:
            _, key, cost, served = events.popleft()
            left = window.events_of[key] - 1
            if left == 0:  # the key's last event in the window
                del window.demanded[key], window.served[key], window.events_of[key]
            else:
                window.events_of[key] = left
                window.demanded[key] -= cost
                window.served[key] -= served
