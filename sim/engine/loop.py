"""The discrete-event loop: the service's own scheduling core against the GPU model, in
virtual seconds.

Why this shape: everything that decides is the real object (the `Scheduler` with its fair
queue, gate and controller; the service's `QuotaStore` decisions in a `MemoryQuotaStore`; the
tiers' shed ladders; the pool's pressure from `scheduler.models.pressure`; the `GpuModel` the demo
server uses); this module only carries time and
decisions between them, as the service's dispatcher does. It is written for speed, since a
planner runs millions of requests:

- arrivals never enter the event heap: they come a window at a time, already merged and
  sorted, and the loop runs every heap event due before the next arrival;
- the heap holds (time, seq, kind, payload) for backend wake-ups, the scheduler's wake-up,
  controller ticks, samples and capacity events; `seq` keeps equal times in push order, so
  a run is a pure function of the scenario and the seed;
- a wake-up that a later change made obsolete stays in the heap and is skipped when popped
  (its time no longer matches its owner's `wake_at`): one pending time per owner, and a new
  entry only when that time changes;
- a backend wakes when its next request finishes (not for first tokens), is advanced once,
  and everything that finished by then is ended in one go.

Replicas: each of the scenario's `replicas` is a gateway process with its own scheduling core
(queue, gate, controller) over the same backends, as `--workers N` and N machines are;
arrivals are dealt to them in turn (a round-robin load balancer), every replica reads the same
scrape of the backends, and one that finishes nothing still hears of completions elsewhere
only through the pressure and its own samples, as a real replica does.

Scrape age: the pressure the controllers see at a tick was scraped `scrape_age_s` before it;
what a replica added to its in-flight since then is its `unseen` count, the in-flight credit.

Each arrival: the key's quota (refused_by_quota; a request that gets no answer, a 503 or a
dropped call, gives its quota back as the gateway's settlement does), then `Scheduler.submit`;
an admission goes to the live backend with the fewest requests in flight, and a backend that
refuses it (its waiting room is full) makes it `Outcome.DROPPED`. Completions feed the
controller a `Sample` of the backend call (admission to completion); the reported latency runs
from arrival.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from typing import Any

from scheduler.core import (
    Admit,
    Outcome,
    Queued,
    Request,
    Sample,
    Scheduler,
    SchedulerConfig,
    Ticket,
    TierConfig,
    request_cost,
)
from sim.engine.arrivals import ArrivalRow, TierArrivals
from sim.engine.capacity import capacity_rps
from sim.engine.controllers import build_controller
from sim.engine.model import ControllerSpec, Scenario
from sim.engine.recorder import Recorder
from sim.engine.results import SimResult
from sim.engine.shedding import FallbackBackend, Shedding
from sim.engine.state import Backend, Replica, SharedQuotas, TierState, probe_config, scrape

ProgressFn = Callable[[float], None]
"""Told the fraction (0..1) of the scenario's duration simulated so far."""

_WINDOW_S = 1.0  # arrivals are generated this many virtual seconds at a time
_MIN_WAKE_S = 1e-9  # a wake-up is never scheduled at or before now
_DRAIN_LIMIT_S = 86_400.0  # past the end plus this, a run that has not drained is a bug
_BACKEND, _FALLBACK, _WAKE, _TICK, _SAMPLE, _LOSE, _RESTORE, _SCRAPE = range(8)
_INF = math.inf
_LOST = 1 << 62  # the load of a lost backend: never the least
_COMPLETED = Outcome.COMPLETED
_DROPPED = Outcome.DROPPED
_heappush = heapq.heappush
_new = tuple.__new__  # makes the hot named tuples (every field given) at half a call's cost

Event = tuple[float, int, int, Any]  # (at, seq, kind, payload)


class Simulation:
    """One run of `scenario` with `seed` (the scenario's own when None), optionally with
    another controller. `run` may be called once."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        seed: int | None = None,
        controller: ControllerSpec | None = None,
    ) -> None:
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        self.controller_spec = controller or scenario.controller
        tier_configs = tuple(
            TierConfig(
                t.name,
                t.weight,
                t.max_wait_s,
                t.max_depth,
                t.shed_on_overload,
                t.fail_fast,
                t.priority,
                t.floor,
                t.protect_latency_s,
            )
            for t in scenario.tiers
        )
        self._replicas: list[Replica] = []
        for index in range(scenario.replicas):
            ctrl, gate = build_controller(self.controller_spec)
            sched = Scheduler(SchedulerConfig(tier_configs, gate), ctrl, now=0.0)
            self._replicas.append(Replica(index, sched))
        self._rate_mode = self.controller_spec.mode.value == "rate"
        self._sources = [
            TierArrivals(
                i,
                t,
                spikes=scenario.spikes,
                diurnal=scenario.diurnal,
                duration_s=scenario.duration_s,
                seed=self.seed,
            )
            for i, t in enumerate(scenario.tiers)
        ]
        quotas = SharedQuotas(scenario.model_quota)  # one store: the model's quota is shared
        self._tiers = [
            TierState(i, t, self._sources[i].key_names, quotas)
            for i, t in enumerate(scenario.tiers)
        ]
        pool = scenario.backends
        probe = probe_config(pool.gpu, self.controller_spec.tick_s)
        self._backends = [Backend(i, pool.gpu, 0.0, probe) for i in range(pool.count)]
        self._alive = list(self._backends)
        self._loads = [0] * pool.count  # in flight per backend; a lost one: _LOST
        self._lost: dict[int, list[Backend]] = {}
        fallback = scenario.fallback
        fallbacks = (
            [FallbackBackend(fallback.gpu) for _ in range(fallback.count)] if fallback else []
        )
        rng = random.Random(f"{self.seed}/ladder")
        self._shedding = Shedding(fallbacks, rng, lambda at, fb: self._push(at, _FALLBACK, fb))
        self._recorder = Recorder(scenario.sample_s, self._tiers)
        self._heap: list[Event] = []
        self._seq = itertools.count()
        self._rid = 0
        self._final_limits: tuple[float, ...] = ()  # each replica's, when arrivals end
        self._need_poll = False
        self._pressure = 0.0
        self._events = 0
        self._last_event_at = 0.0
        self._on_progress: ProgressFn | None = None
        self._ran = False

    @property
    def tiers(self) -> tuple[TierState, ...]:
        """Each tier's running record, its quota store among them (to inspect after `run`)."""
        return tuple(self._tiers)

    def run(self, *, on_progress: ProgressFn | None = None) -> SimResult:
        """Simulate the whole scenario, then drain what is queued or in flight."""
        if self._ran:
            raise RuntimeError("a Simulation runs once; make a new one")
        self._ran = True
        self._on_progress = on_progress
        self._schedule_fixed_events()
        self._arrivals()
        self._drain()
        if on_progress is not None:
            on_progress(1.0)
        return self._result()

    def _push(self, at: float, kind: int, payload: object) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), kind, payload))

    def _schedule_fixed_events(self) -> None:
        sc = self.scenario
        if sc.scrape_age_s > 0:  # else each tick scrapes as it starts
            self._push(self.controller_spec.tick_s - sc.scrape_age_s, _SCRAPE, None)
        self._push(self.controller_spec.tick_s, _TICK, None)
        self._push(sc.sample_s, _SAMPLE, None)
        for index, event in enumerate(sc.capacity_events):
            self._push(event.at_s, _LOSE, index)
            if event.restore_at_s < _INF:
                self._push(event.restore_at_s, _RESTORE, index)

    # -- the loop ---------------------------------------------------------------------------

    def _arrivals(self) -> None:
        """Generate arrivals a window at a time and run each, with every event due before it."""
        duration = self.scenario.duration_s
        rows: list[ArrivalRow] = []
        window_end = 0.0
        while window_end < duration:
            rows.clear()
            window_end = min(duration, window_end + _WINDOW_S)
            for source in self._sources:
                source.until(window_end, rows)
            rows.sort()
            heap, events_until, arrive = self._heap, self._events_until, self._arrive
            for row in rows:
                if heap[0][0] <= row[0]:  # the heap always holds the next tick
                    events_until(row[0])
                arrive(*row)
        self._final_limits = tuple(r.sched.controller.limit for r in self._replicas)

    def _events_until(self, now: float) -> None:
        """Handle every heap event due at or before `now`; backend wake-ups, the hot kind,
        inline."""
        heap, pop = self._heap, heapq.heappop
        complete, reschedule = self._complete, self._reschedule
        while heap[0][0] <= now:
            at, _, kind, backend = event = pop(heap)
            if kind != _BACKEND:
                self._handle(event)
                continue
            self._events += 1
            if at == backend.wake_at and backend.alive:  # else: stale
                complete(backend, at)
                reschedule(backend, at)
                if self._need_poll:
                    self._poll_all(at)

    def _arrive(self, now: float, ti: int, k: int, p: int, o: int) -> None:
        """One arrival: count it, take its key's quota, and submit it to the next replica."""
        ts = self._tiers[ti]
        ts.offered += 1
        try:
            ts.key_offered[k] += 1
        except IndexError:
            ts.grow_keys()
            ts.key_offered[k] += 1
        key = ts.key_names[k]
        cost = request_cost(p, o)
        if ts.quotas is not None and not ts.take_quota(key, int(cost), now):
            ts.refused += 1
            return
        self._rid = rid = self._rid + 1
        replicas = self._replicas
        replica = replicas[rid % len(replicas)]
        sched = replica.sched
        request = _new(Request, (rid, key, ts.name, key, "sim", cost, now, _INF))
        decision = sched.submit(request, now=now)
        if isinstance(decision, Admit):
            ts.admitted += 1
            ts.zero_waits += 1
            self._dispatch(decision.ticket, ts, k, p, o, replica, now)
        elif isinstance(decision, Queued):
            replica.info[rid] = (ts, k, p, o)
            if sched.depth == 1:
                self._arm(replica, now)
            elif now + ts.max_wait_s < replica.wake_at:  # its deadline may be the first
                replica.wake_at = now + ts.max_wait_s
                self._push(replica.wake_at, _WAKE, replica)
        elif not self._shedding.shed(ts, decision.reason, p, o, now, 0.0):
            ts.give_back(key, int(cost), now)
        if self._need_poll:
            self._poll_all(now)

    def _drain(self) -> None:
        heap, pop, handle = self._heap, heapq.heappop, self._handle
        replicas, shedding = self._replicas, self._shedding
        limit = self.scenario.duration_s + _DRAIN_LIMIT_S
        while shedding.inflight or any(r.sched.depth or r.sched.gate.inflight for r in replicas):
            handle(pop(heap))
            if self._last_event_at > limit:
                raise RuntimeError("the simulation did not drain a day after its end")
        self._ended_at = max(self.scenario.duration_s, self._last_event_at)

    def _handle(self, event: Event) -> None:
        now, _, kind, payload = event
        self._events += 1
        self._last_event_at = now
        if kind == _BACKEND:
            if now == payload.wake_at and payload.alive:
                self._complete(payload, now)
                self._reschedule(payload, now)
                if self._need_poll:
                    self._poll_all(now)
        elif kind == _WAKE:
            if now == payload.wake_at:
                self._wake(payload, now)
        elif kind == _FALLBACK:
            if now == payload.wake_at:
                self._shedding.wake(payload, now)
        elif kind == _TICK:
            self._tick(now)
        elif kind == _SCRAPE:
            self._scrape(now)
        elif kind == _SAMPLE:
            self._sample(now)
        elif kind == _LOSE:
            self._lose(payload, now)
        elif kind == _RESTORE:
            self._restore(payload, now)

    # -- the scheduler ----------------------------------------------------------------------

    def _arm(self, replica: Replica, now: float) -> None:
        """Make sure a wake-up is pending for the replica's next deadline."""
        due = replica.sched.next_deadline(now=now)
        if due < replica.wake_at:
            due = max(due, now + _MIN_WAKE_S)
            replica.wake_at = due
            self._push(due, _WAKE, replica)

    def _wake(self, replica: Replica, now: float) -> None:
        replica.wake_at = _INF
        info, shed = replica.info, self._shedding.shed
        for expired in replica.sched.expire(now=now):
            ts, _, p, o = info.pop(expired.request.id)
            if not shed(ts, expired.reason, p, o, now, expired.queued_s):
                ts.give_back(expired.request.key_id, int(expired.request.cost), now)
        self._poll(replica, now)
        self._arm(replica, now)

    def _poll_all(self, now: float) -> None:
        """Room freed on the backends: every replica admits what its gate allows."""
        self._need_poll = False
        for replica in self._replicas:
            if replica.info:  # what it has queued: its scheduler's depth, without asking
                self._poll(replica, now)

    def _poll(self, replica: Replica, now: float) -> None:
        """Admit what the replica's gate allows, again while ending requests frees room."""
        self._need_poll = False
        sched = replica.sched
        if not sched.depth:
            return
        poll, info, dispatch = sched.poll, replica.info, self._dispatch
        while True:
            admits = poll(now=now)
            if not admits:
                break
            for admit in admits:
                ts, k, p, o = info.pop(admit.request.id)
                ts.admitted += 1
                if admit.queued_s > 0:
                    ts.waits.append(admit.queued_s)
                else:
                    ts.zero_waits += 1
                dispatch(admit.ticket, ts, k, p, o, replica, now)
            if self._rate_mode:
                self._arm(replica, now)
            if not self._need_poll:
                break
            self._need_poll = False

    # -- the backends -----------------------------------------------------------------------

    def _dispatch(
        self, ticket: Ticket, ts: TierState, k: int, p: int, o: int, replica: Replica, now: float
    ) -> None:
        """Send an admitted request to the live backend with the fewest in flight (the first
        of equals)."""
        loads = self._loads
        least = min(loads) if loads else _LOST
        if least >= _LOST:
            self._drop(ticket, ts, replica, now)
            return
        index = loads.index(least)
        best = self._backends[index]
        if best.wake_at <= now:  # end what is due first: submit would advance past it
            self._complete(best, now)
        seq = best.gpu.submit(ticket.request.id, p, o, now=now)
        if seq is None:
            self._drop(ticket, ts, replica, now)
        else:
            best.inflight[seq.id] = (ticket, ts, k, replica)
            loads[index] += 1
        self._reschedule(best, now)

    def _drop(self, ticket: Ticket, ts: TierState, replica: Replica, now: float) -> None:
        replica.sched.finish(ticket, Sample(now - ticket.admitted_at, _DROPPED))
        ts.dropped += 1
        ts.give_back(ticket.request.key_id, int(ticket.request.cost), now)
        self._need_poll = True

    def _reschedule(self, backend: Backend, now: float) -> None:
        """Keep one wake-up pending at the backend's next finish; end at once what is due
        now (float rounding can leave an end a hair past the time it was computed for)."""
        next_finish_at = backend.gpu.next_finish_at
        due = next_finish_at()
        while due <= now:
            self._complete(backend, now)
            due = next_finish_at()
        if due != backend.wake_at:
            backend.wake_at = due
            if due < _INF:
                _heappush(self._heap, (due, next(self._seq), _BACKEND, backend))

    def _complete(self, backend: Backend, now: float) -> None:
        """Advance `backend` to now and end every request that finished."""
        finished = backend.gpu.advance(now)
        if not finished:
            return
        inflight = backend.inflight
        self._loads[backend.index] -= len(finished)
        for seq in finished:
            ticket, ts, k, replica = inflight.pop(seq.id)
            admitted_at = ticket.admitted_at
            done_at = seq.finished_at
            ttft = seq.first_token_at - admitted_at
            sample = (done_at - admitted_at, _COMPLETED, ttft, seq.output_tokens)
            replica.sched.finish(ticket, _new(Sample, sample))
            latency = done_at - ticket.request.arrival_at
            ts.completed += 1
            ts.latencies.append(latency)
            ts.key_completed[k] += 1
            if latency <= ts.slo:
                ts.goodput += 1
        self._need_poll = True

    # -- control, capacity and sampling -----------------------------------------------------

    def _scrape(self, now: float) -> None:
        """Read the backends' metrics, as every replica's probe does; the controllers see
        them at the next tick."""
        self._pressure = scrape(self._backends, now)
        for replica in self._replicas:
            replica.scraped_inflight = replica.sched.gate.inflight

    def _tick(self, now: float) -> None:
        tick_s, age_s = self.controller_spec.tick_s, self.scenario.scrape_age_s
        if age_s == 0:
            self._scrape(now)
        else:
            self._push(now + tick_s - age_s, _SCRAPE, None)
        self._push(now + tick_s, _TICK, None)
        for replica in self._replicas:
            replica.sched.tick(now=now, pressure=self._pressure, unseen=replica.unseen())
        for replica in self._replicas:
            self._poll(replica, now)
            self._arm(replica, now)

    def _lose(self, index: int, now: float) -> None:
        count = self.scenario.capacity_events[index].backends
        lost = self._alive[len(self._alive) - count :] if count else []
        self._lost[index] = lost
        for backend in lost:
            backend.alive = False
            for ticket, ts, _, replica in backend.inflight.values():
                self._drop(ticket, ts, replica, now)
            backend.reset(now)
            self._loads[backend.index] = _LOST
        self._alive = [b for b in self._alive if b.alive]
        self._poll_all(now)

    def _restore(self, index: int, now: float) -> None:
        for backend in self._lost.pop(index, []):
            backend.reset(now)
            backend.alive = True
            self._loads[backend.index] = 0
        self._alive = [b for b in self._backends if b.alive]
        self._poll_all(now)

    def _sample(self, now: float) -> None:
        self._recorder.sample(
            now,
            [r.sched for r in self._replicas],
            pressure=self._pressure,
            alive=len(self._alive),
            running=sum(b.gpu.running for b in self._alive),
            slots=len(self._alive) * self.scenario.backends.gpu.max_batch,
        )
        self._push(now + self.scenario.sample_s, _SAMPLE, None)
        if self._on_progress is not None:
            self._on_progress(min(1.0, now / self.scenario.duration_s))

    def _result(self) -> SimResult:
        sc = self.scenario
        for ts, source in zip(self._tiers, self._sources, strict=True):
            ts.prompt_sum, ts.output_sum = source.prompt_tokens, source.output_tokens
        offered = sum(t.offered for t in self._tiers)
        prompt = sum(t.prompt_sum for t in self._tiers) / (offered or 1)
        output = sum(t.output_sum for t in self._tiers) / (offered or 1)
        capacity = capacity_rps(sc.backends, prompt, output)
        stats = [r.sched.statistics().controller for r in self._replicas]
        return SimResult(
            scenario=sc.name,
            seed=self.seed,
            controller=self.controller_spec.label,
            duration_s=sc.duration_s,
            ended_at=self._ended_at,
            requests=offered,
            events=self._events,
            capacity_rps=capacity,
            tiers=tuple(t.result() for t in self._tiers),
            series=self._recorder.series,
            spikes=self._recorder.spikes(sc.spikes, capacity),
            limit_increases=sum(c.increases for c in stats),
            limit_decreases=sum(c.decreases for c in stats),
            replica_limits=self._final_limits,
            utilization=self._recorder.utilization(),
        )


def simulate(
    scenario: Scenario,
    *,
    seed: int | None = None,
    controller: ControllerSpec | None = None,
    on_progress: ProgressFn | None = None,
) -> SimResult:
    """Run `scenario` once and return what it measured."""
    return Simulation(scenario, seed=seed, controller=controller).run(on_progress=on_progress)
