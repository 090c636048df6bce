"""Rate-limit algorithms and their in-memory store, in one import.

Why this design: each algorithm lives in its own small module (`gcra`, `window_log`,
`window_counter`) over the shared vocabulary in `quota`; this module only gathers them so
callers write `from policies.ratelimit import GCRA, Quota, MemoryLimiter`.

| algorithm              | state                               | per window          | reset <=    |
|------------------------|-------------------------------------|---------------------|-------------|
| `SlidingWindowLog`     | `tuple[LogEntry, ...]` (<= limit)   | `limit` (exact)     | `period_s`  |
| `GCRA`                 | TAT `float`                         | `burst + limit - 1` | `T * burst` |
| `SlidingWindowCounter` | `CounterState(window, current, ..)` | `2 * limit - 1`     | `period_s`  |

A window is half-open, [s, s + period_s), and the bounds hold for takes whose times are not
within `TIME_EPSILON_S` of a whole period apart (that tolerance may admit a take that much
early). The GCRA bound follows from its state: after takes of U units from time a_1 on, the TAT
is at least a_1 + U * T (T = period_s / limit), and a take at a_n passes only if the TAT after
it is at most a_n + EPS + T * burst, so U <= burst + (a_n - a_1 + EPS) / T: `burst + limit - 1`
units when a_n - a_1 < period_s - EPS, reached by `burst` units at once and then one every T.
With the default `burst = limit` that is `2 * limit - 1`. The tests (tests/policies, and
tests/backends against a real Redis) measure each bound, and the GCRA's and the log's exactly.

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
