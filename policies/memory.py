"""An in-process store for any `RateAlgorithm`: the limiter of fail-open mode and the simulator.

Why this design: the algorithm is pure, so the store only keeps one state per key and forgets
states that have become equivalent to "never seen" (their `ttl_s` ran out), which keeps memory
bounded by the keys active within one ttl rather than by every key ever seen. Expiries live in a
heap with at most one entry per key, scheduled lazily: when an entry comes due, the key's ttl is
asked again and the key is either evicted or rescheduled. A take therefore costs O(log n)
amortised, and no sweep ever walks the whole table. Like every core object, it is owned by one
task and takes no locks.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Generic

from policies.quota import RateAlgorithm, RateDecision, S


@dataclass(frozen=True, slots=True)
class MemoryLimiterStatistics:
    """A snapshot: keys currently stored and keys evicted so far."""

    keys: int
    evictions: int


class MemoryLimiter(Generic[S]):
    """Per-key states of one `algorithm` (hence one quota), kept in memory."""

    def __init__(self, algorithm: RateAlgorithm[S]) -> None:
        self._algorithm = algorithm
        self._states: dict[str, S] = {}
        self._expiries: list[tuple[float, str]] = []  # heap of (check_at, key)
        self._scheduled: set[str] = set()  # keys with an entry in the heap
        self._evictions = 0

    @property
    def algorithm(self) -> RateAlgorithm[S]:
        """The algorithm whose states this limiter keeps."""
        return self._algorithm

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: object) -> bool:
        return key in self._states

    def take(self, key: str, *, now: float, cost: int = 1) -> RateDecision:
        """Try to take `cost` units for `key` at `now`; cost 0 peeks."""
        decision, state = self.decide(key, now=now, cost=cost)
        self.put(key, state, now=now)
        return decision

    def decide(self, key: str, *, now: float, cost: int = 1) -> tuple[RateDecision, S | None]:
        """What `take` would decide, and the state it would store, without storing it (a
        store that takes several quotas or none decides on all of them first)."""
        self._evict_due(now)
        return self._algorithm.take(self._states.get(key), now=now, cost=cost)

    def put(self, key: str, state: S | None, *, now: float) -> None:
        """Store the state `decide` returned for `key`."""
        self._evict_due(now)
        self._store(key, state, now)

    def force(self, key: str, *, now: float, cost: int) -> None:
        """Take `cost` units for `key` without refusing (a reservation that ran over)."""
        self._evict_due(now)
        self._store(key, self._algorithm.force(self._states.get(key), now=now, cost=cost), now)

    def refund(self, key: str, *, now: float, cost: int) -> None:
        """Give back `cost` units to `key` (nothing happens for an unknown key)."""
        self._evict_due(now)
        state = self._algorithm.refund(self._states.get(key), now=now, cost=cost)
        self._store(key, state, now)

    def state(self, key: str) -> S | None:
        """The stored state of `key` (for tests and differential checks)."""
        return self._states.get(key)

    def statistics(self) -> MemoryLimiterStatistics:
        """A snapshot of the store's size and evictions."""
        return MemoryLimiterStatistics(keys=len(self._states), evictions=self._evictions)

    def _store(self, key: str, state: S | None, now: float) -> None:
        ttl_s = 0.0 if state is None else self._algorithm.ttl_s(state, now=now)
        if state is None or ttl_s <= 0:
            self._states.pop(key, None)  # its heap entry, if any, is dropped when it comes due
            return
        self._states[key] = state
        if key not in self._scheduled:
            heapq.heappush(self._expiries, (now + ttl_s, key))
            self._scheduled.add(key)

    def _evict_due(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            _, key = heapq.heappop(self._expiries)
            self._scheduled.discard(key)
            state = self._states.get(key)
            if state is None:
                continue
            check_at = now + self._algorithm.ttl_s(state, now=now)
            if check_at > now:  # not `ttl_s > 0`: a ttl below float resolution must not spin
                heapq.heappush(self._expiries, (check_at, key))
                self._scheduled.add(key)
            else:
                del self._states[key]
                self._evictions += 1
