"""Request lifecycles per second through the pure core: enqueue -> admit -> complete.

3 tiers x 1,000 keys, window mode, a backlog kept full so every admission goes through the
fair queue, the driver arming its timer (`next_deadline`) after each poll. The same run
times a bare heap-based event loop over as many events (`bench.baseline`) and prints the
rate as a ratio of it, each with its goal; times are the process's CPU time. Run as
`python bench/core.py [--requests N]`; the last line is the rate.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.baseline import goal_lines, heap_loop_rate
from scheduler.core import (
    Admit,
    AIMDConfig,
    AIMDController,
    Outcome,
    Request,
    Sample,
    Scheduler,
    SchedulerConfig,
    Ticket,
    TierConfig,
)

GOAL = 300_000.0  # request lifecycles per second on the project's 2-core machine


def run(requests: int, *, seed: int = 1) -> float:
    tiers = (
        TierConfig("enterprise", 8, max_wait_s=30, max_depth=100_000),
        TierConfig("pro", 3, max_wait_s=10, max_depth=100_000),
        TierConfig("free", 1, max_wait_s=5, max_depth=100_000),
    )
    names = [t.name for t in tiers]
    controller = AIMDController(AIMDConfig(initial_limit=64, max_limit=64))
    core = Scheduler(SchedulerConfig(tiers), controller, now=0.0)
    rng = random.Random(seed)
    keys = [f"k{i}" for i in range(1000)]
    plan = [(names[rng.randrange(3)], keys[rng.randrange(1000)]) for _ in range(requests)]
    inflight: list[Ticket] = []
    done = 0
    now = 0.0
    submit, finish, poll = core.submit, core.finish, core.poll
    sample = Sample(0.01, Outcome.COMPLETED)
    started = time.process_time()
    for i, (tier, key) in enumerate(plan):
        now += 0.0001
        decision = submit(Request(i, key, tier, key, "m", 1.0 + (i & 7), now), now=now)
        if isinstance(decision, Admit):
            inflight.append(decision.ticket)
        if core.depth >= 256:
            for ticket in inflight:
                finish(ticket, sample)
            done += len(inflight)
            inflight = [admit.ticket for admit in poll(now=now)]
            core.next_deadline(now=now)  # as a driver arms its timer (and the queue sweeps)
    elapsed = time.process_time() - started
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300_000)
    args = parser.parse_args()
    before = heap_loop_rate(args.requests)
    rate = run(args.requests)
    baseline = (before + heap_loop_rate(args.requests)) / 2  # timed around the run
    for line in goal_lines("core", rate, "request lifecycles", GOAL, baseline):
        print(line)
    print(f"{rate:,.0f} request lifecycles per second")


if __name__ == "__main__":
    main()
