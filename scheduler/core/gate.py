"""The gate: how many requests may go to the backends, as set by the controller.

Why one gate with two modes: the controller's limit can be read as an admission rate
(requests per second, paced by a token bucket) or as an in-flight window (at most `limit`
requests between admission and completion, self-clocking like TCP). The simulator compares
both on the same scenarios; everything around the gate is the same for either.

Every admission hands out a `Ticket` that must end exactly once: completed, dropped (the
backend said it was saturated) or ignored. The gate also measures how much of its limit was
used since the controller last looked, so the controller only grows a limit that is used.
"""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass

from scheduler.core.request import Outcome, Request

_COMPLETED, _DROPPED = Outcome.COMPLETED, Outcome.DROPPED


class GateMode(enum.Enum):
    RATE = "rate"
    WINDOW = "window"


@dataclass(frozen=True, slots=True)
class GateConfig:
    """`burst_s`: in rate mode, the bucket holds this many seconds of the rate (at least 1)."""

    mode: GateMode = GateMode.WINDOW
    burst_s: float = 0.05

    def __post_init__(self) -> None:
        if not self.burst_s > 0:
            raise ValueError(f"gate.burst_s must be > 0, got {self.burst_s}")


class Ticket:
    """Proof of admission; end it once with the gate's `release`."""

    __slots__ = ("admitted_at", "id", "outcome", "request")

    def __init__(self, ticket_id: int, request: Request, admitted_at: float) -> None:
        self.id = ticket_id
        self.request = request
        self.admitted_at = admitted_at
        self.outcome: Outcome | None = None


@dataclass(frozen=True, slots=True)
class GateStats:
    mode: GateMode
    limit: float
    inflight: int
    admitted: int
    completed: int
    dropped: int
    ignored: int


class Gate:
    """Admits while the limit allows. In window mode in-flight never exceeds `floor(limit)`
    (at least 1); in rate mode admissions are paced at `limit` per second."""

    def __init__(self, config: GateConfig, *, limit: float, now: float) -> None:
        self._config = config
        self._rate_mode = config.mode is GateMode.RATE
        self._limit = 0.0
        self._window = 1
        self._tokens = 0.0
        self._refilled_at = now
        self._ids = itertools.count(1)
        self._inflight = 0
        self._completed = self._dropped = self._ignored = 0
        self._admitted = 0
        self._peak_inflight = 0
        self._window_admitted = 0
        self._window_started_at = now
        self.set_limit(limit, now=now)
        self._tokens = self._capacity()

    @property
    def mode(self) -> GateMode:
        return self._config.mode

    @property
    def limit(self) -> float:
        return self._limit

    @property
    def inflight(self) -> int:
        return self._inflight

    def window(self) -> int:
        """The in-flight cap in window mode."""
        return self._window

    def set_limit(self, limit: float, *, now: float) -> None:
        if not limit > 0:
            raise ValueError(f"gate limit must be > 0, got {limit}")
        self._refill(now)
        self._limit = limit
        self._window = max(1, math.floor(limit))
        self._tokens = min(self._tokens, self._capacity())

    def _capacity(self) -> float:
        return max(1.0, self._limit * self._config.burst_s)

    def _refill(self, now: float) -> None:
        if now > self._refilled_at:
            self._tokens = min(
                self._capacity(), self._tokens + (now - self._refilled_at) * self._limit
            )
            self._refilled_at = now

    def room(self, *, now: float) -> int:
        """How many admissions the limit allows now, one after the other."""
        if not self._rate_mode:
            return max(0, self._window - self._inflight)
        self._refill(now)
        return int(self._tokens) if self._tokens >= 1.0 else 0  # each admission takes 1.0

    def ready_at(self, *, now: float) -> float:
        """When `room` turns positive by time alone (`math.inf` if only a release will do)."""
        if self.room(now=now) > 0:
            return now
        if self._config.mode is GateMode.WINDOW:
            return math.inf
        return now + (1.0 - self._tokens) / self._limit

    def admit(self, request: Request, *, now: float) -> Ticket | None:
        """A ticket if the limit allows one more request now, else None."""
        inflight = self._inflight
        if self._rate_mode:
            self._refill(now)
            if not self._tokens >= 1.0:
                return None
            self._tokens -= 1.0
        elif inflight >= self._window:
            return None
        self._inflight = inflight = inflight + 1
        self._admitted += 1
        self._window_admitted += 1
        if inflight > self._peak_inflight:
            self._peak_inflight = inflight
        return Ticket(next(self._ids), request, now)

    def admit_bypass(self, request: Request, *, now: float) -> Ticket:
        """A ticket outside the limit (bypass keys): counted in flight, never refused."""
        self._inflight += 1
        self._admitted += 1
        return Ticket(next(self._ids), request, now)

    def release(self, ticket: Ticket, outcome: Outcome) -> None:
        """End `ticket`. Ending a ticket twice is a programming error."""
        if ticket.outcome is not None:
            raise RuntimeError(f"ticket {ticket.id} already ended as {ticket.outcome.value}")
        ticket.outcome = outcome
        self._inflight -= 1
        if outcome is _COMPLETED:
            self._completed += 1
        elif outcome is _DROPPED:
            self._dropped += 1
        else:
            self._ignored += 1

    def take_utilization(self, *, now: float) -> float:
        """How much of the limit was used since the last call (0..1+), and start anew.

        Window mode: the peak in-flight over the window. Rate mode: admissions per second
        over the limit."""
        if self._config.mode is GateMode.WINDOW:
            used = self._peak_inflight / self.window()
        else:
            elapsed = now - self._window_started_at
            used = self._window_admitted / (elapsed * self._limit) if elapsed > 0 else 0.0
        self._peak_inflight = self._inflight
        self._window_admitted = 0
        self._window_started_at = now
        return used

    def statistics(self) -> GateStats:
        return GateStats(
            mode=self._config.mode,
            limit=self._limit,
            inflight=self._inflight,
            admitted=self._admitted,
            completed=self._completed,
            dropped=self._dropped,
            ignored=self._ignored,
        )
