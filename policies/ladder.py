"""Shed ladders: what a tier tries, in order, for a request it cannot admit.

Why this design: shedding happens in the service (deadline passed, queue full, overload), but the
order of fallbacks is tier policy, so it is plain data plus one pure rule. The service looks up
the cache and asks the fallback model's gate for headroom, then `choose` says which step to take;
no I/O happens here.

`REJECT` (a 503 with Retry-After) is always the last resort and is never stored in `steps`:
configs may still spell it out as the last name (`["cache", "reject"]`) for readability. An empty
ladder rejects straight away.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Step(enum.Enum):
    """One rung of a shed ladder."""

    CACHE = "cache"
    """Serve the cached response for the same request (fresh, or stale if the ladder allows)."""
    FALLBACK = "fallback"
    """Route to the tier's fallback model, if it has headroom."""
    REJECT = "reject"
    """Refuse with 503 and Retry-After. Implied as the last step."""


class CacheState(enum.Enum):
    """What the response cache holds for the shed request."""

    MISS = "miss"
    FRESH = "fresh"
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class ShedLadder:
    """The ordered steps a shed request tries before `Step.REJECT`.

    `steps` holds distinct `Step.CACHE` / `Step.FALLBACK` values; `serve_stale` lets the cache
    step serve an expired entry (the response says so).
    """

    steps: tuple[Step, ...] = (Step.CACHE, Step.FALLBACK)
    serve_stale: bool = True

    def __post_init__(self) -> None:
        for index, step in enumerate(self.steps):
            if not isinstance(step, Step):
                raise ValueError(f"ladder.steps[{index}] must be a Step, got {step!r}")
            if step is Step.REJECT:
                raise ValueError(f"ladder.steps[{index}]: reject is implied, do not list it")
            if step in self.steps[:index]:
                raise ValueError(f"ladder.steps[{index}]: duplicate step {step.value!r}")
        if not isinstance(self.serve_stale, bool):
            raise ValueError(f"ladder.serve_stale must be a bool, got {self.serve_stale!r}")

    @classmethod
    def from_names(cls, names: Iterable[str], *, serve_stale: bool = True) -> ShedLadder:
        """Build a ladder from config names, e.g. `["cache", "fallback"]` (case-insensitive).

        A trailing `"reject"` is accepted and dropped. Raises `ValueError` naming the bad entry.
        """
        if isinstance(names, str):
            raise ValueError("ladder.steps must be a list of step names, not a string")
        listed = list(names)
        steps: list[Step] = []
        for index, name in enumerate(listed):
            step = _parse_step(index, name)
            if step is Step.REJECT:
                if index != len(listed) - 1:
                    raise ValueError(f"ladder.steps[{index}]: 'reject' must be the last step")
                continue
            if step in steps:
                raise ValueError(f"ladder.steps[{index}]: duplicate step {name!r}")
            steps.append(step)
        return cls(steps=tuple(steps), serve_stale=serve_stale)

    def names(self) -> tuple[str, ...]:
        """The config names of `steps` (the inverse of `from_names`)."""
        return tuple(step.value for step in self.steps)

    def choose(self, *, cache: CacheState, fallback_has_headroom: bool) -> Step:
        """The first step that can serve the request, or `Step.REJECT`."""
        for step in self.steps:
            if step is Step.CACHE and (
                cache is CacheState.FRESH or (cache is CacheState.STALE and self.serve_stale)
            ):
                return step
            if step is Step.FALLBACK and fallback_has_headroom:
                return step
        return Step.REJECT


def fallback_has_headroom(*, any_healthy: bool, inflight: int, max_inflight: int) -> bool:
    """Whether the fallback pool can take one more request: it has a healthy backend and
    fewer than its `max_inflight` requests in flight (the service's pool and the simulator's)."""
    return any_healthy and inflight < max_inflight


def _parse_step(index: int, name: object) -> Step:
    if isinstance(name, str):
        try:
            return Step(name.strip().lower())
        except ValueError:
            pass
    expected = ", ".join(step.value for step in Step)
    raise ValueError(f"ladder.steps[{index}]: unknown step {name!r} (expected one of: {expected})")
