"""Rate-limit algorithms and their in-memory store, in one import.

Why this design: each algorithm lives in its own small module (`gcra`, `window_log`,
`window_counter`) over the shared vocabulary in `quota`; this module only gathers them so
callers write `from policies.ratelimit import GCRA, Quota, MemoryLimiter`.

| algorithm              | state                                     | units per period_s window |
|------------------------|-------------------------------------------|---------------------------|
| `GCRA`                 | TAT `float`                               | <= `burst + limit`        |
| `SlidingWindowLog`     | `tuple[LogEntry, ...]` (<= limit entries) | <= `limit` (exact)        |
| `SlidingWindowCounter` | `CounterState(window, current, previous)` | <= `2 * limit`            |

`None` is every algorithm's state for a key never seen.
"""

from __future__ import annotations

from policies.gcra import GCRA
from policies.memory import MemoryLimiter, MemoryLimiterStatistics
from policies.quota import TIME_EPSILON_S, Quota, RateAlgorithm, RateDecision
from policies.window_counter import CounterState, SlidingWindowCounter
from policies.window_log import LogEntry, LogState, SlidingWindowLog

__all__ = [
    "GCRA",
    "TIME_EPSILON_S",
    "CounterState",
    "LogEntry",
    "LogState",
    "MemoryLimiter",
    "MemoryLimiterStatistics",
    "Quota",
    "RateAlgorithm",
    "RateDecision",
    "SlidingWindowCounter",
    "SlidingWindowLog",
]
