"""A two-level weighted fair queue: tiers share by weight, keys inside a tier share equally.

Why this design: both levels are start-time fair queuing (SFQ). Each flow (a tier at the
root, a key inside its tier) carries a virtual start tag; the flow with the smallest tag is
served next and its tag then advances by `cost / weight`. SFQ needs no knowledge of the next
request's cost to choose, keeps a flow that comes back from idle from claiming credit for the
time it was away (its tag restarts at the current virtual time), and costs O(log flows) per
operation. Tiers whose tags tie go heaviest first, so a burst into idle tiers serves the
higher tier first. A flow's last finish tag is remembered while it is still ahead of the
virtual time, so a key that empties and refills at once cannot jump the line; stale tags are
swept in bulk.

Priority bands: tiers of a higher `priority` are served strictly first; each band is a fair
queue of its own (its own virtual time), so weights decide only among the tiers of one band.
With every tier in band 0 (the default) there is one band and the queue is exactly the above.

Expiry: a request's deadline is the earlier of its own and arrival plus the tier's maximum
wait. Deadlines from the tier's wait are in arrival order, so each tier keeps a FIFO of them
and only earlier, caller-set deadlines go on a heap. Cancel is O(1): the entry is marked and
skipped wherever it is met later (lazy deletion).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from scheduler.core.request import Request


@dataclass(frozen=True, slots=True)
class TierConfig:
    """One tier's share and bounds. `shed_on_overload` tiers are shed at once while the
    controller reports congestion instead of waiting in the queue; `fail_fast` tiers are shed
    at once when the wait predicted for a request is longer than it may wait. `priority` is
    the tier's band (higher served first), `floor` the share of the limit its band keeps while
    backlogged, `protect_latency_s` the latency past which lower bands are held back
    (`scheduler.core.bands`)."""

    name: str
    weight: float
    max_wait_s: float
    max_depth: int
    shed_on_overload: bool = False
    fail_fast: bool = False
    priority: int = 0
    floor: float = 0.0
    protect_latency_s: float = 0.0

    def __post_init__(self) -> None:
        where = f"tiers.{self.name or '?'}"
        if not self.name:
            raise ValueError("tiers: a tier needs a non-empty name")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"{where}.weight must be a positive number, got {self.weight}")
        if not self.max_wait_s > 0:
            raise ValueError(f"{where}.max_wait_s must be > 0, got {self.max_wait_s}")
        if self.max_depth < 1:
            raise ValueError(f"{where}.max_depth must be >= 1, got {self.max_depth}")
        if not 0 <= self.floor < 1:
            raise ValueError(f"{where}.floor must be in [0, 1), got {self.floor}")
        if not (self.protect_latency_s >= 0 and math.isfinite(self.protect_latency_s)):
            raise ValueError(
                f"{where}.protect_latency_s must be >= 0 (0: off), got {self.protect_latency_s}"
            )


class Backlog(NamedTuple):
    """What a new request of a key finds in its tier: the tier's queued cost, the key's part
    of it, and how many keys share the tier (the key among them)."""

    tier_cost: float
    key_cost: float
    keys: int


class EntryState(enum.Enum):
    QUEUED = "queued"
    ADMITTED = "admitted"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


_QUEUED, _ADMITTED = EntryState.QUEUED, EntryState.ADMITTED
_heappush, _heappop, _heapreplace = heapq.heappush, heapq.heappop, heapq.heapreplace
_MAX_SPARE_FLOWS = 1024  # emptied key flows kept for reuse; a burst of keys does not pin more


class Entry:
    """A queued request and its place in the queue; the handle for `cancel`."""

    __slots__ = ("deadline_at", "request", "state", "tier")

    def __init__(self, request: Request, deadline_at: float, tier: _Tier) -> None:
        self.request = request
        self.deadline_at = deadline_at
        self.state = _QUEUED
        self.tier = tier


class _KeyFlow:
    """A key with queued entries; an emptied one is kept for reuse (`_spare_flows`)."""

    __slots__ = ("cost", "entries", "key_id")

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        self.entries: deque[Entry] = deque()
        self.cost = 0.0  # of its live (queued) entries


class _Band:
    """The tiers of one priority: a fair queue of its own at the root."""

    __slots__ = ("depth", "priority", "root", "vtime")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.depth = 0  # live (queued) entries
        self.root: list[tuple[float, float, int, _Tier]] = []  # (start, -weight, seq, tier)
        self.vtime = 0.0


class _Tier:
    __slots__ = (
        "active",
        "band",
        "config",
        "cost",
        "depth",
        "fifo",
        "finish",
        "flows",
        "heap",
        "key_finish",
        "start",
        "sweep_at_size",
        "vtime",
    )

    def __init__(self, config: TierConfig, band: _Band) -> None:
        self.config = config
        self.band = band
        self.depth = 0  # live (queued) entries
        self.cost = 0.0  # their total cost
        self.active = False  # present in the root heap
        self.start = 0.0  # root-level start tag while active
        self.finish = 0.0  # root-level finish tag of the last service
        self.vtime = 0.0  # virtual time among this tier's keys
        self.flows: dict[str, _KeyFlow] = {}  # keys with entries (live or lazily dead)
        self.heap: list[tuple[float, int, _KeyFlow]] = []
        self.key_finish: dict[str, float] = {}  # idle keys still ahead of vtime
        self.sweep_at_size = 1024
        self.fifo: deque[Entry] = deque()  # entries whose deadline is arrival + max_wait


@dataclass(frozen=True, slots=True)
class TierStats:
    name: str
    depth: int
    active_keys: int


@dataclass(frozen=True, slots=True)
class QueueStats:
    depth: int
    tiers: tuple[TierStats, ...]


class WeightedFairQueue:
    """Hierarchical weighted fair queue over tiers and keys. Not thread-safe: one task owns it."""

    def __init__(self, tiers: list[TierConfig]) -> None:
        if not tiers:
            raise ValueError("tiers: at least one tier is required")
        self._tiers: dict[str, _Tier] = {}
        priorities = sorted({t.priority for t in tiers}, reverse=True)
        self._bands = [_Band(p) for p in priorities]  # highest first
        for config in tiers:
            if config.name in self._tiers:
                raise ValueError(f"tiers.{config.name}: duplicate tier name")
            band = self._bands[priorities.index(config.priority)]
            self._tiers[config.name] = _Tier(config, band)
        self._seq = itertools.count()
        self._early: list[tuple[float, int, Entry]] = []  # caller deadlines before the tier's
        # Live (queued) entries. Read it, never set it: a plain attribute rather than a
        # property, since every submit and poll of the scheduler reads it.
        self.depth = 0
        self._spare_flows: list[_KeyFlow] = []  # retired flows, reused: less churn per key

    def tier(self, name: str) -> TierConfig:
        """The config of tier `name`; `KeyError` names an unknown tier."""
        try:
            return self._tiers[name].config
        except KeyError:
            raise KeyError(f"unknown tier {name!r}") from None

    def tier_depth(self, name: str) -> int:
        return self._tiers[name].depth

    @property
    def bands(self) -> int:
        """How many priority bands; band 0 is the highest."""
        return len(self._bands)

    def band_of(self, tier: str) -> int:
        return self._bands.index(self._tiers[tier].band)

    def band_depth(self, band: int) -> int:
        return self._bands[band].depth

    def is_full(self, tier: str) -> bool:
        t = self._tiers[tier]
        return t.depth >= t.config.max_depth

    def push(self, request: Request, *, now: float) -> Entry | None:
        """Queue `request`; None when its tier is at maximum depth."""
        tier = self._tiers.get(request.tier)
        if tier is None:
            raise KeyError(f"unknown tier {request.tier!r}")
        cost, deadline_at = request.cost, request.deadline_at
        if not cost > 0:
            raise ValueError(f"request.cost must be > 0, got {cost}")
        config = tier.config
        if tier.depth >= config.max_depth:
            return None
        tier_deadline = request.arrival_at + config.max_wait_s
        if deadline_at < tier_deadline:
            entry = Entry(request, deadline_at, tier)
            _heappush(self._early, (deadline_at, next(self._seq), entry))
        else:
            entry = Entry(request, tier_deadline, tier)
            tier.fifo.append(entry)
        key_id = request.key_id
        flow = tier.flows.get(key_id)
        if flow is None:
            vtime = tier.vtime
            start = tier.key_finish.pop(key_id, vtime)
            start = start if start > vtime else vtime  # max(vtime, start), without the call
            spare = self._spare_flows
            if spare:
                flow = spare.pop()
                flow.key_id = key_id
                flow.cost = 0.0
            else:
                flow = _KeyFlow(key_id)
            tier.flows[key_id] = flow
            _heappush(tier.heap, (start, next(self._seq), flow))
        flow.entries.append(entry)
        flow.cost += cost
        tier.cost += cost
        tier.depth += 1
        band = tier.band
        band.depth += 1
        self.depth += 1
        if not tier.active:
            tier.active = True
            tier.start = max(band.vtime, tier.finish)
            heapq.heappush(band.root, (tier.start, -config.weight, next(self._seq), tier))
        return entry

    def cancel(self, entry: Entry) -> bool:
        """Take a queued entry out (O(1)); False if it already left the queue."""
        if entry.state is not _QUEUED:
            return False
        entry.state = EntryState.CANCELLED
        self._forget(entry)
        return True

    def pop(self, band: int = 0) -> Entry | None:
        """The next entry of `band` in fair order, marked admitted; None when it is empty."""
        the_band = self._bands[band]
        root = the_band.root
        while root:
            tier = root[0][3]
            entry = self._pop_from_tier(tier)
            if entry is None:  # only dead entries were left in this tier
                _heappop(root)
                tier.active = False
                continue
            weight, cost = tier.config.weight, entry.request.cost
            the_band.vtime = start = tier.start
            tier.finish = finish = start + cost / weight
            entry.state = _ADMITTED
            tier.depth = depth = tier.depth - 1
            the_band.depth -= 1
            self.depth -= 1
            tier.cost = tier.cost - cost if depth else 0.0
            if depth > 0:
                tier.start = finish
                _heapreplace(root, (finish, -weight, next(self._seq), tier))
            else:
                _heappop(root)
                tier.active = False
            return entry
        return None

    def _pop_from_tier(self, tier: _Tier) -> Entry | None:
        """The next live entry of `tier`'s keys; a key left empty retires, its finish tag
        kept while it is ahead of the tier's virtual time."""
        heap = tier.heap
        while heap:
            finish, _, flow = heap[0]
            entries = flow.entries
            while entries and entries[0].state is not _QUEUED:
                entries.popleft()
            entry = None
            if entries:
                entry = entries.popleft()
                cost = entry.request.cost
                flow.cost -= cost
                tier.vtime = finish
                finish += cost
                while entries and entries[0].state is not _QUEUED:
                    entries.popleft()
                if entries:
                    _heapreplace(heap, (finish, next(self._seq), flow))
                    return entry
            _heappop(heap)
            key_id = flow.key_id
            del tier.flows[key_id]
            if len(self._spare_flows) < _MAX_SPARE_FLOWS:
                self._spare_flows.append(flow)
            if finish > tier.vtime:
                key_finish = tier.key_finish
                key_finish[key_id] = finish
                if len(key_finish) >= tier.sweep_at_size:
                    self._sweep(tier)
            if entry is not None:
                return entry
        return None

    def _sweep(self, tier: _Tier) -> None:
        vtime = tier.vtime
        tier.key_finish = {k: f for k, f in tier.key_finish.items() if f > vtime}
        tier.sweep_at_size = max(1024, 2 * len(tier.key_finish))

    def _forget(self, entry: Entry) -> None:
        tier, cost = entry.tier, entry.request.cost
        tier.flows[entry.request.key_id].cost -= cost  # its flow holds it until it is popped
        tier.depth -= 1
        tier.band.depth -= 1
        tier.cost = tier.cost - cost if tier.depth else 0.0
        self.depth -= 1

    def backlog(self, tier: str, key_id: str) -> Backlog:
        """What a request of `key_id` would find queued in its tier."""
        t = self._tiers[tier]
        flow = t.flows.get(key_id)
        if flow is None:
            return Backlog(t.cost, 0.0, len(t.flows) + 1)
        return Backlog(t.cost, flow.cost, len(t.flows))

    def active_weight(self, besides: str) -> float:
        """The weight of the tiers of `besides`' band with queued requests, and of tier
        `besides` in any case."""
        band = self._tiers[besides].band
        return sum(
            t.config.weight
            for name, t in self._tiers.items()
            if t.band is band and (t.depth or name == besides)
        )

    def next_deadline(self) -> float:
        """When the earliest queued request expires (`math.inf` when none)."""
        best = math.inf
        for tier in self._tiers.values():
            fifo = tier.fifo
            while fifo and fifo[0].state is not _QUEUED:
                fifo.popleft()
            if fifo and fifo[0].deadline_at < best:
                best = fifo[0].deadline_at
        early = self._early
        while early and early[0][2].state is not _QUEUED:
            heapq.heappop(early)
        if early and early[0][0] < best:
            best = early[0][0]
        return best

    def expire(self, *, now: float) -> list[Entry]:
        """Remove and return every queued entry whose deadline is at or before `now`."""
        expired: list[Entry] = []
        for tier in self._tiers.values():
            fifo = tier.fifo
            while fifo and (fifo[0].state is not _QUEUED or fifo[0].deadline_at <= now):
                entry = fifo.popleft()
                if entry.state is _QUEUED:
                    self._expire(entry, expired)
        early = self._early
        while early and (early[0][2].state is not _QUEUED or early[0][0] <= now):
            entry = heapq.heappop(early)[2]
            if entry.state is _QUEUED:
                self._expire(entry, expired)
        return expired

    def _expire(self, entry: Entry, into: list[Entry]) -> None:
        entry.state = EntryState.EXPIRED
        self._forget(entry)
        into.append(entry)

    def statistics(self) -> QueueStats:
        return QueueStats(
            depth=self.depth,
            tiers=tuple(TierStats(name, t.depth, len(t.flows)) for name, t in self._tiers.items()),
        )
