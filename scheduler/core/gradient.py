"""A gradient controller after Netflix's Gradient2, for comparison with AIMD in the simulator.

Why: AIMD needs an absolute latency target; Gradient2 needs none. It compares the short-term
latency with a slow moving average of it: when the short term rises above the long term
(times a tolerance) the limit shrinks in proportion, otherwise it grows by a queue
allowance of sqrt(limit). Drops and pressure over threshold count as the steepest gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scheduler.core.controller import ControllerStats, LatencySignal, Sample, percentile
from scheduler.core.request import Outcome


@dataclass(frozen=True, slots=True)
class GradientConfig:
    initial_limit: float = 16.0
    min_limit: float = 1.0
    max_limit: float = 1024.0
    tolerance: float = 1.5
    smoothing: float = 0.2
    long_window_ticks: int = 60
    pressure_threshold: float = 0.8
    min_utilization: float = 0.5
    latency_signal: LatencySignal = LatencySignal.LATENCY
    tick_s: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError("controller: need 0 < min_limit <= initial_limit <= max_limit")
        if not self.tolerance >= 1:
            raise ValueError(f"controller.tolerance must be >= 1, got {self.tolerance}")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"controller.smoothing must be in (0, 1], got {self.smoothing}")
        if self.long_window_ticks < 1:
            raise ValueError(
                f"controller.long_window_ticks must be >= 1, got {self.long_window_ticks}"
            )
        if not 0 < self.pressure_threshold <= 1:
            raise ValueError(
                f"controller.pressure_threshold must be in (0, 1], got {self.pressure_threshold}"
            )
        if not self.tick_s > 0:
            raise ValueError(f"controller.tick_s must be > 0, got {self.tick_s}")


class GradientController:
    name = "gradient"

    def __init__(self, config: GradientConfig) -> None:
        self._config = config
        self._limit = config.initial_limit
        self._signals: list[float] = []
        self._drops = 0
        self._long = math.nan
        self._latency = math.nan
        self._pressure = 0.0
        self._congested = False
        self._increases = 0
        self._decreases = 0

    @property
    def limit(self) -> float:
        return self._limit

    @property
    def congested(self) -> bool:
        return self._congested

    def record(self, sample: Sample) -> None:
        if sample.outcome is Outcome.DROPPED:
            self._drops += 1
        elif sample.outcome is Outcome.COMPLETED and len(self._signals) < 4096:
            self._signals.append(sample.signal(self._config.latency_signal))

    def tick(
        self, *, now: float, utilization: float, pressure: float, inflight: int = 0, unseen: int = 0
    ) -> float:
        cfg = self._config
        short = percentile(self._signals, 0.5)
        drops, self._drops, self._signals = self._drops, 0, []
        self._pressure = pressure
        if drops or pressure > cfg.pressure_threshold:
            gradient = 0.5
        elif math.isnan(short):
            self._congested = False
            return self._limit
        else:
            self._latency = short
            if math.isnan(self._long):
                self._long = short
            alpha = 2 / (cfg.long_window_ticks + 1)
            self._long = self._long * (1 - alpha) + short * alpha
            if self._long / short > 2:  # recover from a long average that drifted high
                self._long *= 0.95
            if utilization < cfg.min_utilization:
                self._congested = False
                return self._limit
            gradient = max(0.5, min(1.0, cfg.tolerance * self._long / short))
        self._congested = gradient < 1.0
        target = self._limit * gradient + (0.0 if self._congested else math.sqrt(self._limit))
        new = self._limit * (1 - cfg.smoothing) + target * cfg.smoothing
        new = min(cfg.max_limit, max(cfg.min_limit, new))
        if new > self._limit:
            self._increases += 1
        elif new < self._limit:
            self._decreases += 1
        self._limit = new
        return new

    def statistics(self) -> ControllerStats:
        return ControllerStats(
            self.name,
            self._limit,
            self._latency,
            self._pressure,
            self._congested,
            self._increases,
            self._decreases,
        )
