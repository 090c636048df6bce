"""A circuit breaker: stop calling a dependency that keeps failing, probe it now and then.

Why this design: like every policy here it is a plain state machine that is told the time and
returns decisions, so the service wraps it around Redis (or a backend) and the simulator and the
tests drive it with plain numbers. The caller asks `allow(now=...)` before a call and reports the
outcome with `record_success` / `record_failure`; the breaker never calls anything itself.

    CLOSED --(failure_threshold consecutive failures)--> OPEN
    OPEN --(first allow() at or after opened_at + open_s)--> HALF_OPEN (that call is the probe)
    HALF_OPEN --(success)--> CLOSED          HALF_OPEN --(failure)--> OPEN (timer restarts)

While half-open only the probe goes through. A probe whose outcome is never reported (its task
was cancelled, say) would otherwise hold the breaker half-open for ever, so once `open_s` has
passed since the probe was let through, the next `allow` lets another probe through. Outcomes
reported while open come from calls started before the breaker opened and are ignored.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection
from dataclasses import dataclass


class BreakerState(enum.Enum):
    """Where the breaker is: calls flow (CLOSED), are refused (OPEN), or one probes (HALF_OPEN)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """Open after `failure_threshold` consecutive failures; probe again after `open_s` seconds.

    Invalid values raise `ValueError` naming the field, e.g.
    "breaker.open_s must be a finite number > 0, got 0".
    """

    failure_threshold: int = 5
    open_s: float = 1.0

    def __post_init__(self) -> None:
        threshold = self.failure_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ValueError(
                f"breaker.failure_threshold must be an integer >= 1, got {threshold!r}"
            )
        open_s = self.open_s
        if (
            isinstance(open_s, bool)
            or not isinstance(open_s, int | float)
            or not math.isfinite(open_s)
            or open_s <= 0
        ):
            raise ValueError(f"breaker.open_s must be a finite number > 0, got {open_s!r}")


@dataclass(frozen=True, slots=True)
class BreakerStatistics:
    """A snapshot of a `CircuitBreaker`.

    - `state`: the state as of the last call (an expired OPEN turns HALF_OPEN on `allow`).
    - `consecutive_failures`: failures since the last success (reset when the breaker closes).
    - `failures` / `successes`: outcomes recorded in total (ignored ones included).
    - `opened`: how many times the breaker has opened (re-opening after a failed probe counts).
    - `rejected`: how many `allow` calls returned False.
    - `probe_at`: when the next probe may go through (open: the first probe; half-open: a
      replacement for a probe never reported), None while closed.
    """

    state: BreakerState
    consecutive_failures: int
    failures: int
    successes: int
    opened: int
    rejected: int
    probe_at: float | None


class CircuitBreaker:
    """The breaker state machine (see the module docstring). Owned by one task; no locks."""

    __slots__ = (
        "_config",
        "_consecutive",
        "_failures",
        "_opened",
        "_opened_at",
        "_probe_started_at",
        "_rejected",
        "_state",
        "_successes",
    )

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self._config = config if config is not None else BreakerConfig()
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._failures = 0
        self._successes = 0
        self._opened = 0
        self._rejected = 0
        self._opened_at = -math.inf
        self._probe_started_at = -math.inf

    def __repr__(self) -> str:
        return f"CircuitBreaker({self._config!r}, state={self._state.name})"

    @property
    def config(self) -> BreakerConfig:
        """The breaker's configuration."""
        return self._config

    @property
    def state(self) -> BreakerState:
        """The state as of the last call."""
        return self._state

    def allow(self, *, now: float) -> bool:
        """Whether a call may go through at `now`; True while half-open means "you are the probe".

        Every True must be followed by `record_success` or `record_failure` for that call.
        """
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            if now >= self._opened_at + self._config.open_s:
                self._state = BreakerState.HALF_OPEN
                self._probe_started_at = now
                return True
        elif now >= self._probe_started_at + self._config.open_s:  # the probe was lost
            self._probe_started_at = now
            return True
        self._rejected += 1
        return False

    def record_success(self, *, now: float) -> None:
        """A call let through has succeeded: close a half-open breaker, reset the failure run."""
        self._successes += 1
        if self._state is BreakerState.OPEN:
            return
        self._state = BreakerState.CLOSED
        self._consecutive = 0

    def record_failure(self, *, now: float) -> None:
        """A call let through has failed: open after the threshold, or re-open a half-open one."""
        self._failures += 1
        if self._state is BreakerState.OPEN:
            return
        self._consecutive += 1
        if (
            self._state is BreakerState.HALF_OPEN
            or self._consecutive >= self._config.failure_threshold
        ):
            self._open(now)

    def statistics(self) -> BreakerStatistics:
        """A frozen snapshot of the breaker's state and counters."""
        probe_at = None
        if self._state is BreakerState.OPEN:
            probe_at = self._opened_at + self._config.open_s
        elif self._state is BreakerState.HALF_OPEN:
            probe_at = self._probe_started_at + self._config.open_s
        return BreakerStatistics(
            state=self._state,
            consecutive_failures=self._consecutive,
            failures=self._failures,
            successes=self._successes,
            opened=self._opened,
            rejected=self._rejected,
            probe_at=probe_at,
        )

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._opened += 1


class ScopedBreakers:
    """One breaker per scope, made on first use, all with one config.

    Why scopes: on a Redis Cluster each shard (the node serving a key's slot) fails on its
    own, so a dead shard must open only its own breaker; the other tenants keep Redis. The
    caller names the scope (a node's name; one scope, "", for a single server or Sentinel)."""

    __slots__ = ("_breakers", "_config")

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self._config = config if config is not None else BreakerConfig()
        self._breakers: dict[str, CircuitBreaker] = {}

    @property
    def config(self) -> BreakerConfig:
        return self._config

    def get(self, scope: str = "") -> CircuitBreaker:
        """The breaker of `scope` (made closed on first use)."""
        breaker = self._breakers.get(scope)
        if breaker is None:
            breaker = self._breakers[scope] = CircuitBreaker(self._config)
        return breaker

    @property
    def state(self) -> BreakerState:
        """The worst state over the scopes (OPEN, then HALF_OPEN, then CLOSED)."""
        states = {b.state for b in self._breakers.values()}
        for state in (BreakerState.OPEN, BreakerState.HALF_OPEN):
            if state in states:
                return state
        return BreakerState.CLOSED

    def retain(self, scopes: Collection[str]) -> None:
        """Forget the breakers of scopes no longer in use (a node gone after a failover), so
        the old node's open breaker does not stand for the shard's new master."""
        for scope in [s for s in self._breakers if s not in scopes]:
            del self._breakers[scope]

    def statistics(self) -> dict[str, BreakerStatistics]:
        """Each scope's snapshot, by scope."""
        return {scope: b.statistics() for scope, b in self._breakers.items()}
