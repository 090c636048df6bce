"""The pure scheduling core: told the time, returns decisions, never waits or does I/O."""

from scheduler.core.controller import (
    AIMDConfig,
    AIMDController,
    Controller,
    ControllerStats,
    FixedController,
    LatencySignal,
    Sample,
    credited_growth,
)
from scheduler.core.gate import Gate, GateConfig, GateMode, Ticket
from scheduler.core.gradient import GradientConfig, GradientController
from scheduler.core.request import (
    Admit,
    Decision,
    Outcome,
    Queued,
    Request,
    Shed,
    ShedReason,
    request_cost,
)
from scheduler.core.scheduler import Scheduler, SchedulerConfig, SchedulerStats
from scheduler.core.wfq import TierConfig, WeightedFairQueue

__all__ = [
    "AIMDConfig",
    "AIMDController",
    "Admit",
    "Controller",
    "ControllerStats",
    "Decision",
    "FixedController",
    "Gate",
    "GateConfig",
    "GateMode",
    "GradientConfig",
    "GradientController",
    "LatencySignal",
    "Outcome",
    "Queued",
    "Request",
    "Sample",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerStats",
    "Shed",
    "ShedReason",
    "Ticket",
    "TierConfig",
    "WeightedFairQueue",
    "credited_growth",
    "request_cost",
]
