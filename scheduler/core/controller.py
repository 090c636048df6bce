"""Controllers compute the gate's limit from what the backends show. They only compute a
number (Netflix concurrency-limits' split of "how many" from "who next"): samples and
pressure go in, `tick` returns the new limit, and the scheduler applies it to the gate.

AIMD is the default: add `increase_step` each healthy tick in which the limit is actually
used, multiply by `decrease_factor` on congestion (latency over target, pressure over
threshold, or any drop). After a cut on latency it holds for `cooldown_s`, so the samples
from requests admitted under the old limit do not cut it again; pressure and drops describe
the backends now, so they cut again as soon as in-flight is down to the new limit (TCP's one
cut per window). Latency only counts while the limit is used: slow calls under an idle limit
are long outputs, not queueing this limit caused.

Why slow start: from a small `initial_limit`, one step a tick needs a minute to reach the
hundreds of slots a pool of batching engines runs. So, as TCP does, the limit first grows by
`slow_start_growth` a tick, until the first congestion signal; from then on it is AIMD.

Why in-flight credit: the pressure comes from scraped metrics, which cannot show the requests
dispatched since the scrape. Growing on the whole in-flight would overshoot by what the
scrape has not seen yet (llm-d's dispatch credit). So slow start grows by the share of
in-flight that the pressure has seen: with all of it unseen, only `increase_step`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from scheduler.core.request import Outcome

_MAX_SAMPLES = 2048  # per tick; a busier tick keeps the most recent
_COMPLETED, _DROPPED = Outcome.COMPLETED, Outcome.DROPPED


class LatencySignal(enum.Enum):
    """Which latency the controller holds to its target."""

    LATENCY = "latency"  # end to end
    TTFT = "ttft"  # time to first token (end to end when the call did not stream)
    TPOT = "tpot"  # time per output token after the first


_LATENCY = LatencySignal.LATENCY


class Sample(NamedTuple):
    """One finished backend call."""

    latency_s: float
    outcome: Outcome = Outcome.COMPLETED
    ttft_s: float | None = None
    output_tokens: int = 0

    def signal(self, which: LatencySignal) -> float:
        if which is LatencySignal.LATENCY:
            return self.latency_s
        ttft = self.latency_s if self.ttft_s is None else self.ttft_s
        if which is LatencySignal.TTFT:
            return ttft
        return (self.latency_s - ttft) / max(1, self.output_tokens - 1)


@dataclass(frozen=True, slots=True)
class ControllerStats:
    name: str
    limit: float
    latency_s: float  # the signal seen in the last tick that had samples (nan before any)
    pressure: float
    congested: bool
    increases: int
    decreases: int


class Controller(Protocol):
    """Computes the gate's limit; one task owns it (no locks)."""

    @property
    def limit(self) -> float: ...

    @property
    def congested(self) -> bool:
        """True while the last tick saw congestion: `shed_on_overload` tiers are shed."""
        ...

    def record(self, sample: Sample) -> None: ...

    def tick(
        self, *, now: float, utilization: float, pressure: float, inflight: int = 0, unseen: int = 0
    ) -> float:
        """`inflight`: admitted and not ended; `unseen`: of those, the ones the scrape that
        `pressure` comes from could not see (in-flight added since it was taken)."""
        ...

    def statistics(self) -> ControllerStats: ...


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values` by nearest rank; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True, slots=True)
class AIMDConfig:
    """Every gain of the AIMD controller; replace it live with `AIMDController.configure`."""

    initial_limit: float = 16.0
    min_limit: float = 1.0
    max_limit: float = 1024.0
    increase_step: float = 1.0
    slow_start_growth: float = 1.5  # per tick until the first congestion; 1 turns it off
    decrease_factor: float = 0.7
    target_latency_s: float = 5.0
    latency_signal: LatencySignal = LatencySignal.LATENCY
    latency_percentile: float = 0.9
    pressure_threshold: float = 0.8
    cooldown_s: float = 4.0  # samples from the old limit keep coming for seconds (sim/)
    min_utilization: float = 0.5
    tick_s: float = 0.25

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"controller.{name} {rule}, got {getattr(self, name)!r}")

        need(self.min_limit > 0, "min_limit", "must be > 0")
        need(self.max_limit >= self.min_limit, "max_limit", "must be >= min_limit")
        need(
            self.min_limit <= self.initial_limit <= self.max_limit,
            "initial_limit",
            "must lie between min_limit and max_limit",
        )
        need(self.increase_step > 0, "increase_step", "must be > 0")
        need(self.slow_start_growth >= 1, "slow_start_growth", "must be >= 1")
        need(0 < self.decrease_factor < 1, "decrease_factor", "must be in (0, 1)")
        need(self.target_latency_s > 0, "target_latency_s", "must be > 0")
        need(0 < self.latency_percentile <= 1, "latency_percentile", "must be in (0, 1]")
        need(0 < self.pressure_threshold <= 1, "pressure_threshold", "must be in (0, 1]")
        need(self.cooldown_s >= 0, "cooldown_s", "must be >= 0")
        need(0 <= self.min_utilization <= 1, "min_utilization", "must be in [0, 1]")
        need(0.01 <= self.tick_s <= 60, "tick_s", "must be in [0.01, 60]")


def credited_growth(growth: float, *, inflight: int, unseen: int) -> float:
    """The slow-start factor for a tick: `growth` on the share of in-flight that the scrape
    has seen, 1 (no growth) on the share it has not."""
    if inflight <= 0:
        return growth
    seen = max(0, inflight - unseen) / inflight
    return 1.0 + (growth - 1.0) * seen


class AIMDController:
    """Slow start, then additive increase, multiplicative decrease, with app-limited and
    cooldown guards."""

    name = "aimd"

    def __init__(self, config: AIMDConfig) -> None:
        self._config = config
        self._signal = config.latency_signal  # read at every sample
        self._limit = config.initial_limit
        self._signals: list[float] = []
        self._drops = 0
        self._hold_until = -math.inf
        self._latency = math.nan
        self._pressure = 0.0
        self._congested = False
        self._increases = 0
        self._decreases = 0
        self._slow_start = config.slow_start_growth > 1

    @property
    def config(self) -> AIMDConfig:
        return self._config

    @property
    def limit(self) -> float:
        return self._limit

    @property
    def congested(self) -> bool:
        return self._congested

    @property
    def slow_start(self) -> bool:
        """True until the first congestion signal (or while `slow_start_growth` is 1)."""
        return self._slow_start

    def configure(self, config: AIMDConfig) -> None:
        """Replace the gains; the limit is clamped into the new bounds at once."""
        self._config = config
        self._signal = config.latency_signal
        self._limit = min(config.max_limit, max(config.min_limit, self._limit))
        self._slow_start = self._slow_start and config.slow_start_growth > 1

    def record(self, sample: Sample) -> None:
        outcome = sample.outcome
        if outcome is _COMPLETED:
            signals = self._signals
            if len(signals) >= _MAX_SAMPLES:
                del signals[: _MAX_SAMPLES // 2]
            which = self._signal
            signals.append(sample.latency_s if which is _LATENCY else sample.signal(which))
        elif outcome is _DROPPED:
            self._drops += 1

    def tick(
        self, *, now: float, utilization: float, pressure: float, inflight: int = 0, unseen: int = 0
    ) -> float:
        cfg = self._config
        latency = percentile(self._signals, cfg.latency_percentile)
        if self._signals:
            self._latency = latency
        self._pressure = pressure
        used = utilization >= cfg.min_utilization
        slow = used and latency > cfg.target_latency_s  # False for nan (no samples)
        now_signal = pressure > cfg.pressure_threshold or self._drops > 0
        self._congested = slow or now_signal
        self._signals = []
        self._drops = 0
        if self._congested:
            self._slow_start = False
            # Pressure and drops tell of now: cut again as soon as the last cut shows, once
            # in-flight is down to the limit. Latency tells of a backend call ago: cooldown.
            settled = now_signal and inflight <= self._limit
            if settled or now >= self._hold_until:
                self._limit = max(cfg.min_limit, self._limit * cfg.decrease_factor)
                self._hold_until = now + cfg.cooldown_s
                self._decreases += 1
        elif used and self._limit < cfg.max_limit:
            grown = self._limit + cfg.increase_step
            if self._slow_start:
                factor = credited_growth(cfg.slow_start_growth, inflight=inflight, unseen=unseen)
                grown = max(grown, self._limit * factor)
            self._limit = min(cfg.max_limit, grown)
            self._increases += 1
        return self._limit

    def statistics(self) -> ControllerStats:
        return ControllerStats(
            name=self.name,
            limit=self._limit,
            latency_s=self._latency,
            pressure=self._pressure,
            congested=self._congested,
            increases=self._increases,
            decreases=self._decreases,
        )


class FixedController:
    """A constant limit: the baseline the others are measured against."""

    name = "fixed"

    def __init__(self, limit: float) -> None:
        if not limit > 0:
            raise ValueError(f"controller.limit must be > 0, got {limit}")
        self._limit = limit

    @property
    def limit(self) -> float:
        return self._limit

    @property
    def congested(self) -> bool:
        return False

    def record(self, sample: Sample) -> None:
        pass

    def tick(
        self, *, now: float, utilization: float, pressure: float, inflight: int = 0, unseen: int = 0
    ) -> float:
        return self._limit

    def statistics(self) -> ControllerStats:
        return ControllerStats(self.name, self._limit, math.nan, 0.0, False, 0, 0)
