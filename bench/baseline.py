"""The yardstick of the pure benchmarks: a bare heap-based discrete-event loop on this machine.

Why: the core and the simulator are Python event loops, so their rates scale with the
machine's speed. Timing the barest such loop in the same run, a `heapq` pop and push per
event and a counter for its work, turns a rate into a ratio that a slower machine leaves
roughly where it was: a slow machine shows as a slow baseline. All three time the process's
CPU (`time.process_time`), so what other processes on a shared machine run does not count
as ours (wall time on a 2-core machine with other benchmarks running swings by 2x).
"""

from __future__ import annotations

import heapq
import random
import time

_PENDING = 256  # events waiting in the heap, about the core's backlog
REFERENCE_EVENTS_PER_S = 3_000_000.0
"""The baseline on the project's 2-core machine (README, Benchmarks): where the goals hold."""


def heap_loop_rate(events: int, *, seed: int = 1) -> float:
    """Events per second of the bare loop over `events` events."""
    rng = random.Random(seed)
    delays = [rng.random() for _ in range(1024)]
    heap = [(float(i), i) for i in range(_PENDING)]  # sorted, so already a heap
    seq = _PENDING
    work = 0
    pop, push = heapq.heappop, heapq.heappush
    started = time.process_time()
    for i in range(events):
        at, _ = pop(heap)
        work += 1
        push(heap, (at + delays[i & 1023], seq))
        seq += 1
    elapsed = time.process_time() - started
    assert work == events
    return events / elapsed


def goal_lines(name: str, rate: float, unit: str, goal: float, baseline: float) -> list[str]:
    """The baseline, `rate` against its goal, and the rate as a ratio of the baseline against
    the goal's ratio (the goal at the reference machine's baseline)."""
    goal_ratio = goal / REFERENCE_EVENTS_PER_S
    return [
        f"baseline: bare heap event loop {baseline:,.0f} events per CPU second "
        f"(reference machine {REFERENCE_EVENTS_PER_S:,.0f})",
        f"{name}: {rate:,.0f} {unit} per CPU second, goal {goal:,.0f}: {rate / goal:.2f} of it",
        f"{name} / baseline: {rate / baseline:.4f}, goal {goal_ratio:.4f}: "
        f"{rate / baseline / goal_ratio:.2f} of it",
    ]
