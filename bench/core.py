"""Request lifecycles per second through the pure core: enqueue -> admit -> complete.

3 tiers x 1,000 keys, window mode, a backlog kept full so every admission goes through the
fair queue. Run as `python bench/core.py [--requests N]`; the last line is the rate.
"""

from __future__ import annotations

import argparse
import random
import time

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
    started = time.perf_counter()
    for i, (tier, key) in enumerate(plan):
        now += 0.0001
        decision = core.submit(Request(i, key, tier, key, "m", 1.0 + (i & 7), now), now=now)
        if isinstance(decision, Admit):
            inflight.append(decision.ticket)
        if core.depth >= 256:
            for ticket in inflight:
                core.finish(ticket, Sample(0.01, Outcome.COMPLETED))
                done += 1
            inflight = [admit.ticket for admit in core.poll(now=now)]
    elapsed = time.perf_counter() - started
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300_000)
    args = parser.parse_args()
    rate = run(args.requests)
    print(f"{rate:,.0f} request lifecycles per second")


if __name__ == "__main__":
    main()
