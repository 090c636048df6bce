"""What happens to a request the scheduler sheds: the tier's ladder, walked as the service
walks it (`policies.ladder.ShedLadder.choose`), with the cache and fallback pool simulated.

The cache holds the response with the tier's `cache_hit_ratio` (drawn per shed request, from
its own seeded generator). The fallback pool is GPU models of its own: it has headroom when
fewer requests than its batch slots are in flight (the gateway's rule, with `max_inflight`
set to the slots), the least busy backend takes it, and a request degraded to it runs there,
so its load is real; its outcome is counted when it is routed (`degraded_to_fallback`).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

from policies.ladder import CacheState, Step, fallback_has_headroom
from scheduler.core import ShedReason
from scheduler.models.gpu import GpuConfig, GpuModel
from sim.engine.state import TierState

PushFn = Callable[[float, "FallbackBackend"], None]
"""Schedules a fallback backend's wake-up at a time."""


class FallbackBackend:
    __slots__ = ("config", "gpu", "inflight", "wake_at")

    def __init__(self, config: GpuConfig) -> None:
        self.config = config
        self.gpu = GpuModel(config, now=0.0)
        self.wake_at = math.inf
        self.inflight: set[int] = set()  # sequence ids


class Shedding:
    """Walks shed requests down their tier's ladder and runs the fallback pool."""

    def __init__(self, fallback: list[FallbackBackend], rng: random.Random, push: PushFn) -> None:
        self._fallback = fallback
        self._rng = rng
        self._push = push
        self._ids = itertools.count(1)
        self.inflight = 0

    def shed(
        self, ts: TierState, reason: ShedReason, p: int, o: int, now: float, waited_s: float
    ) -> bool:
        """Count a shed request by `reason` and by the ladder step that served it, and the
        `waited_s` before it was shed; whether it got an answer (the cache or the fallback)
        rather than a 503."""
        ts.reasons[reason] += 1
        if waited_s > 0:
            ts.shed_waits.append(waited_s)
        else:
            ts.shed_zero_waits += 1
        if ts.first_shed_at == math.inf:
            ts.first_shed_at = now
        ratio = ts.cache_ratio
        cache = CacheState.FRESH if ratio and self._rng.random() < ratio else CacheState.MISS
        target = self._target() if self._fallback else None
        step = ts.ladder.choose(cache=cache, fallback_has_headroom=target is not None)
        if step is Step.CACHE:
            ts.cache += 1
        elif step is Step.FALLBACK and target is not None and self._submit(target, p, o, now):
            ts.fallback += 1
        else:
            ts.shed += 1
            return False
        return True

    def _target(self) -> FallbackBackend | None:
        """The least busy fallback backend, if the pool has headroom as the gateway judges
        it (`policies.ladder.fallback_has_headroom`), its `max_inflight` being its slots."""
        slots = sum(b.config.max_batch for b in self._fallback)
        if not fallback_has_headroom(any_healthy=True, inflight=self.inflight, max_inflight=slots):
            return None
        return min(self._fallback, key=lambda b: len(b.inflight))

    def _submit(self, fb: FallbackBackend, p: int, o: int, now: float) -> bool:
        if fb.wake_at <= now:
            self.wake(fb, now)
        seq_id = next(self._ids)
        if fb.gpu.submit(seq_id, p, o, now=now) is None:
            return False
        fb.inflight.add(seq_id)
        self.inflight += 1
        self.wake(fb, now)
        return True

    def wake(self, fb: FallbackBackend, now: float) -> None:
        """Advance a fallback backend to `now`, forget what finished, and keep one wake-up
        pending at its next event (again at once if rounding left one due now)."""
        due = -math.inf
        while due <= now:
            for seq in fb.gpu.advance(now):
                fb.inflight.discard(seq.id)
                self.inflight -= 1
            due = fb.gpu.next_event_at()
        if due != fb.wake_at:
            fb.wake_at = due
            if due < math.inf:
                self._push(due, fb)
