"""The scheduling core: the fair queue, the gate and the controller behind one sans-IO object.

One driver owns it (the service's dispatcher task, or the simulator's event loop) and calls,
always with the current time: `submit` for each arrival, `poll` to admit what the gate allows,
`expire` at `next_deadline()`, `finish` when a backend call ends, and `tick` every
`tick_s` of the controller. Each returns decisions; nothing here waits or does I/O.

An arrival that must queue is shed at once (`PREDICTED_WAIT`) when its tier fails fast and
the wait predicted for it (`scheduler.core.wait`) is longer than it may wait: its answer from
the shed ladder comes now, not at its deadline, which stays the backstop.

Priority bands (`scheduler.core.bands`), when the tiers have more than one `priority`: the
highest queued band is admitted first, a lower band only under its ceilings or its floor.
With one band (the default) none of it runs and the weights alone decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.core.bands import Bands
from scheduler.core.controller import Controller, ControllerStats, Sample
from scheduler.core.gate import Gate, GateConfig, GateMode, GateStats, Ticket
from scheduler.core.request import Admit, Decision, Outcome, Queued, Request, Shed, ShedReason
from scheduler.core.wait import WaitPredictor
from scheduler.core.wfq import Entry, QueueStats, TierConfig, WeightedFairQueue


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    tiers: tuple[TierConfig, ...]
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass(slots=True)
class _TierCounts:
    config: TierConfig
    submitted: int = 0
    admitted: int = 0
    admitted_cost: float = 0.0
    admitted_after_queue: int = 0
    bypassed: int = 0
    shed: dict[ShedReason, int] = field(default_factory=lambda: dict.fromkeys(ShedReason, 0))


@dataclass(frozen=True, slots=True)
class TierCounts:
    name: str
    depth: int
    submitted: int
    admitted: int
    admitted_after_queue: int
    bypassed: int
    shed: dict[str, int]


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    tiers: tuple[TierCounts, ...]
    queue: QueueStats
    gate: GateStats
    controller: ControllerStats
    draining: bool
    band_ceilings: tuple[float, ...] = ()  # each priority band's, highest first (none: one band)


class Scheduler:
    """Weighted fair queue + gate + controller, driven with explicit `now`."""

    def __init__(self, config: SchedulerConfig, controller: Controller, *, now: float) -> None:
        self._queue = WeightedFairQueue(list(config.tiers))
        self._controller = controller
        self._gate = Gate(config.gate, limit=controller.limit, now=now)
        self._entries: dict[int, Entry] = {}
        self._counts = {t.name: _TierCounts(t) for t in config.tiers}
        self._wait = WaitPredictor([t.name for t in config.tiers], now=now)
        self._rate_mode = config.gate.mode is GateMode.RATE
        self._draining = False
        queue = self._queue
        self._bands = None
        if queue.bands > 1:
            band_of = {t.name: queue.band_of(t.name) for t in config.tiers}
            self._bands = Bands(config.tiers, band_of, window=self._gate.window(), now=now)

    @property
    def controller(self) -> Controller:
        return self._controller

    @property
    def gate(self) -> Gate:
        return self._gate

    @property
    def depth(self) -> int:
        return self._queue.depth

    @property
    def draining(self) -> bool:
        return self._draining

    def tier(self, name: str) -> TierConfig:
        return self._queue.tier(name)

    def submit(self, request: Request, *, now: float) -> Decision:
        """Admit at once, queue, or shed (queue full, congestion, draining)."""
        counts = self._counts.get(request.tier)
        if counts is None:
            raise KeyError(f"unknown tier {request.tier!r}")
        counts.submitted += 1
        if self._draining:
            return self._shed(request, ShedReason.DRAINING, counts)
        queue, bands = self._queue, self._bands
        if queue.depth == 0 if bands is None else self._may_pass(request.tier):
            ticket = self._gate.admit(request, now=now)
            if ticket is not None:
                counts.admitted += 1
                counts.admitted_cost += request.cost
                if bands is not None:
                    bands.admitted(ticket)
                return tuple.__new__(Admit, (request, ticket, 0.0))  # Admit(...) at half the cost
        config = counts.config
        if config.shed_on_overload and self._controller.congested:
            return self._shed(request, ShedReason.OVERLOAD, counts)
        if config.fail_fast:
            wait_s = self.predict_wait_s(request, now=now)
            if wait_s > min(request.deadline_at, request.arrival_at + config.max_wait_s) - now:
                counts.shed[ShedReason.PREDICTED_WAIT] += 1
                return Shed(request, ShedReason.PREDICTED_WAIT, predicted_wait_s=wait_s)
        entry = queue.push(request, now=now)
        if entry is None:
            return self._shed(request, ShedReason.QUEUE_FULL, counts)
        self._entries[request.id] = entry
        return tuple.__new__(Queued, (request,))  # Queued(request) at half the cost

    def _may_pass(self, tier: str) -> bool:
        """With bands: whether a request of `tier` may be admitted without queueing (nothing
        queued in its band or above, and its ceilings allow)."""
        assert self._bands is not None
        band, queue = self._bands.band(tier), self._queue
        if any(queue.band_depth(b) for b in range(band + 1)):
            return False
        return self._bands.allows(tier, self._gate.window())

    def predict_wait_s(self, request: Request, *, now: float) -> float:
        """How long `request` would wait in the queue if it were queued now (0 while the
        admission rate is not known yet)."""
        queue, tier, gate = self._queue, request.tier, self._gate
        backlog = queue.backlog(tier, request.key_id)
        if not backlog.tier_cost:
            return 0.0
        share = self._counts[tier].config.weight / queue.active_weight(tier)
        band = 0 if self._bands is None else self._bands.band(tier)
        if band:  # below the top band: the slots its band can count on, at their own pace
            queued_above = any(queue.band_depth(b) for b in range(band))
            assert self._bands is not None
            slots = self._bands.slots(tier, gate.window(), queued_above=queued_above)
            return self._wait.predict_wait_s(
                tier,
                backlog,
                request.cost,
                share=share,
                drain_rate=self._wait.slots_rate(slots),
                now=now,
                measured=False,
            )
        slots_per_s = gate.limit if self._rate_mode else None
        drain_rate = self._wait.drain_rate(slots_per_s=slots_per_s, window=gate.window(), now=now)
        return self._wait.predict_wait_s(
            tier, backlog, request.cost, share=share, drain_rate=drain_rate, now=now
        )

    def _shed(self, request: Request, reason: ShedReason, counts: _TierCounts) -> Shed:
        counts.shed[reason] += 1
        return Shed(request, reason)

    def submit_bypass(self, request: Request, *, now: float) -> Admit:
        """Admit outside the queue and the limit (bypass keys); still counted in flight."""
        self._counts[request.tier].bypassed += 1
        ticket = self._gate.admit_bypass(request, now=now)
        if self._bands is not None:
            self._bands.admitted(ticket)
        return Admit(request, ticket, 0.0)

    def cancel(self, request_id: int) -> bool:
        """Take a queued request out (its caller went away); False if it is not queued."""
        entry = self._entries.pop(request_id, None)
        return entry is not None and self._queue.cancel(entry)

    def poll(self, *, now: float) -> list[Admit]:
        """Admit queued requests in fair order while the gate allows."""
        admitted: list[Admit] = []
        queue, gate, entries, all_counts = self._queue, self._gate, self._entries, self._counts
        bands = self._bands
        room = gate.room(now=now)
        while room and queue.depth:
            band = 0
            if bands is not None:
                next_band = self._next_band()
                if next_band is None:
                    break
                band = next_band
            entry = queue.pop(band)
            if entry is None:
                break
            room -= 1
            request = entry.request
            del entries[request.id]
            ticket = gate.admit(request, now=now)
            assert ticket is not None
            counts = all_counts[request.tier]
            counts.admitted += 1
            counts.admitted_cost += request.cost
            counts.admitted_after_queue += 1
            if bands is not None:
                bands.admitted(ticket)
            admitted.append(tuple.__new__(Admit, (request, ticket, now - request.arrival_at)))
        return admitted

    def expire(self, *, now: float) -> list[Shed]:
        """Shed every queued request whose deadline has come."""
        shed: list[Shed] = []
        for entry in self._queue.expire(now=now):
            request = entry.request
            del self._entries[request.id]
            self._counts[request.tier].shed[ShedReason.DEADLINE] += 1
            shed.append(Shed(request, ShedReason.DEADLINE, now - request.arrival_at))
        return shed

    def next_deadline(self, *, now: float) -> float:
        """When the driver must call again: the next expiry, or when the gate refills (not
        while the bands hold the queue back: a call's end or a tick moves them)."""
        queue = self._queue
        due = queue.next_deadline()
        if queue.depth and (self._bands is None or self._next_band() is not None):
            due = min(due, self._gate.ready_at(now=now))
        return due

    def _next_band(self) -> int | None:
        assert self._bands is not None
        queue = self._queue
        depths = [queue.band_depth(b) for b in range(queue.bands)]
        return self._bands.next_band(depths, self._gate.window())

    def finish(self, ticket: Ticket, sample: Sample) -> None:
        """End an admitted request; its sample feeds the controller."""
        self._gate.release(ticket, sample.outcome)
        self._controller.record(sample)
        self._wait.observe_call(sample.latency_s, ticket.request.cost)
        if self._bands is not None:
            request = ticket.request
            latency_s = None  # from arrival, of an answer
            if sample.outcome is Outcome.COMPLETED:
                latency_s = ticket.admitted_at - request.arrival_at + sample.latency_s
            self._bands.ended(ticket, latency_s)

    def ignore(self, ticket: Ticket) -> None:
        """End an admitted request that says nothing about load (client gone, bad request)."""
        self._gate.release(ticket, Outcome.IGNORED)
        if self._bands is not None:
            self._bands.ended(ticket, None)

    def tick(self, *, now: float, pressure: float = 0.0, unseen: int = 0) -> float:
        """Let the controller look at the last interval and set the gate's new limit.
        `unseen`: how many more requests are in flight now than when the scrape that
        `pressure` comes from was taken (0 when it is fresh)."""
        gate, queue = self._gate, self._queue
        self._wait.observe_tick(
            now=now,
            admitted={name: c.admitted_cost for name, c in self._counts.items()},
            depths={name: queue.tier_depth(name) for name in self._counts},
        )
        utilization = gate.take_utilization(now=now)
        limit = self._controller.tick(
            now=now,
            utilization=utilization,
            pressure=pressure,
            inflight=gate.inflight,
            unseen=min(unseen, gate.inflight),
        )
        self._gate.set_limit(limit, now=now)
        if self._bands is not None:
            depths = [queue.band_depth(b) for b in range(queue.bands)]
            self._bands.tick(now=now, window=self._gate.window(), depths=depths)
        return limit

    def drain(self) -> None:
        """Refuse new arrivals from now on; queued requests still leave by admission or expiry."""
        self._draining = True

    def undrain(self) -> None:
        """Take new arrivals again (an operator's drain undone)."""
        self._draining = False

    def statistics(self) -> SchedulerStats:
        queue = self._queue.statistics()
        depths = {t.name: t.depth for t in queue.tiers}
        return SchedulerStats(
            tiers=tuple(
                TierCounts(
                    name=name,
                    depth=depths[name],
                    submitted=c.submitted,
                    admitted=c.admitted,
                    admitted_after_queue=c.admitted_after_queue,
                    bypassed=c.bypassed,
                    shed={r.value: n for r, n in c.shed.items()},
                )
                for name, c in self._counts.items()
            ),
            queue=queue,
            gate=self._gate.statistics(),
            controller=self._controller.statistics(),
            draining=self._draining,
            band_ceilings=() if self._bands is None else self._bands.ceilings(),
        )
