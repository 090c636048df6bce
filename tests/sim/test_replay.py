"""One arrival schedule through the simulator and through the service's own decision objects,
compared decision by decision (DESIGN §5: "a test replays one schedule through both").

The service side is wired as the service wires it: the scenario's gateway config
(`bench.fidelity_schedule.gateway_config`, the live rig's) read by `load_settings`; the core built
as `Replica.start` builds it (`Scheduler` over the settings' tiers and gate, an
`AIMDController` on the settings' gains) and owned by a real `Dispatcher` task; the quota taken
by the service's `QuotaGuard` and settled through its `QuotaHold` (with no Redis: the fail-open
limiter on its `MemoryQuotaStore`, the tiers' default fail mode); each request walks the
gateway's path (`Gateway._take_quota`, then `_schedule`, then `_shed` or the call's end), in
one trio task per arrival, in trio's virtual time (MockClock, autojump).

The backend is the one thing not under test: it is a fake that plays the simulator's GPU back,
ending each admitted request when the simulator ended it, with the simulator's `Sample`, and
the controller is told, at each tick, the pressure the simulator's probe read then. So what
may differ is only what decides: quota refusals, admissions (at once or after a wait), queueing,
shedding and its reason, and the controller's limit after every tick, each with its time.

Exactness: times are compared with `==`. Where two things happen at the same instant, the
order of the service's tasks is trio's (which shuffles a batch of ready tasks), so the log
is compared as one list in time order, with the decisions of one instant sorted: what is
compared at an instant is the set of decisions, not which task trio happened to run first.
The scenario has one backend, so no two backends finish at the same instant.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import trio
import trio.testing

from bench.fidelity_schedule import arrival_schedule, gateway_config
from policies.breaker import ScopedBreakers
from scheduler.core import (
    Admit,
    AIMDController,
    Decision,
    Outcome,
    Request,
    Sample,
    Scheduler,
    SchedulerConfig,
    Shed,
    Ticket,
)
from scheduler.core.memory_quota import MemoryQuotaStore
from scheduler.core.quota_store import QuotaDecision
from scheduler.openai.body import InferenceCall
from scheduler.service.config import load_settings
from scheduler.service.dispatcher import Dispatcher
from scheduler.service.quota import AdaptiveTimeout, QuotaGuard
from sim.engine import Simulation
from sim.scenario import parse_scenario

SCENARIO = """
name = "replay"
duration_s = 16
seed = 5

[backends]
count = 1
max_batch = 8
max_waiting = 4096

[controller]
kind = "aimd"
tick_s = 0.25
initial_limit = 6
min_limit = 2
max_limit = 16
increase_step = 1
decrease_factor = 0.7
target_latency_s = 1.5

[[tiers]]
name = "enterprise"
weight = 8
max_wait_s = 6
max_depth = 200
slo_latency_s = 10
rate_rps = 5
keys = 2
prompt_tokens = { dist = "uniform", min = 10, max = 200 }
output_tokens = { dist = "uniform", min = 5, max = 60 }

[[tiers]]
name = "pro"
weight = 3
max_wait_s = 3
max_depth = 40
fail_fast = true  # shed on arrival; Free waits: shed when its queue is full, at the deadline
slo_latency_s = 10
rate_rps = 8
keys = 3
prompt_tokens = { dist = "uniform", min = 10, max = 200 }
output_tokens = { dist = "uniform", min = 5, max = 60 }

[tiers.quota]
unit = "tokens"
algorithm = "sliding_counter"
limit = 800
period_s = 1
burst = 1600

[[tiers]]
name = "free"
weight = 1
max_wait_s = 1
max_depth = 10
shed_on_overload = true
slo_latency_s = 10
rate_rps = 14
keys = 4
key_skew = 1.2
prompt_tokens = { dist = "uniform", min = 10, max = 200 }
output_tokens = { dist = "uniform", min = 5, max = 60 }

[tiers.quota]
algorithm = "gcra"
limit = 3
period_s = 1
burst = 3
"""

Who = tuple[float, str]  # an arrival: (its time, its key)
Entry = tuple[float, str, Who, str]  # (at, what, whose, detail)


@dataclass
class Log:
    """Decisions in the order they were made; `now` is the last time any decision object
    was told (a backend's end is told no time of its own)."""

    entries: list[Entry] = field(default_factory=list)
    now: float = 0.0

    def add(self, at: float, what: str, who: Who, detail: str = "") -> None:
        self.entries.append((at, what, who, detail))


def _who(request: Request) -> Who:
    return (request.arrival_at, request.key_id)


class RecordingCore:
    """A `Scheduler` that writes down every decision it returns; everything else passes."""

    def __init__(self, core: Scheduler, log: Log) -> None:
        self._core = core
        self._log = log
        self.finished: dict[Who, tuple[float, Sample]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def submit(self, request: Request, *, now: float) -> Decision:
        self._log.now = now
        decision = self._core.submit(request, now=now)
        if isinstance(decision, Shed):
            self._log.add(now, "shed", _who(request), decision.reason.value)
        else:
            self._log.add(now, "admit" if isinstance(decision, Admit) else "queue", _who(request))
        return decision

    def poll(self, *, now: float) -> list[Admit]:
        self._log.now = now
        admits = self._core.poll(now=now)
        for admit in admits:
            self._log.add(now, "admit", _who(admit.request), "after a wait")
        return admits

    def expire(self, *, now: float) -> list[Shed]:
        self._log.now = now
        sheds = self._core.expire(now=now)
        for shed in sheds:
            self._log.add(now, "shed", _who(shed.request), shed.reason.value)
        return sheds

    def next_deadline(self, *, now: float) -> float:
        self._log.now = now
        return self._core.next_deadline(now=now)

    def tick(self, *, now: float, pressure: float = 0.0, unseen: int = 0) -> float:
        self._log.now = now
        limit = self._core.tick(now=now, pressure=pressure, unseen=unseen)
        state = "congested" if self._core.controller.congested else "healthy"
        self._log.add(now, "tick", (now, ""), f"{limit!r} {state} at pressure {pressure!r}")
        return limit

    def finish(self, ticket: Ticket, sample: Sample) -> None:
        self.finished[_who(ticket.request)] = (self._log.now, sample)
        self._core.finish(ticket, sample)


class RecordingGpu:
    """A backend's GPU model that tells the log the time it is advanced to."""

    def __init__(self, gpu: Any, log: Log) -> None:
        self._gpu = gpu
        self._log = log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gpu, name)

    def advance(self, now: float) -> Any:
        self._log.now = now
        return self._gpu.advance(now)

    def submit(self, *args: Any, now: float) -> Any:
        self._log.now = now
        return self._gpu.submit(*args, now=now)


class RecordingQuotas(MemoryQuotaStore):
    """A tier's quota store in the simulator, writing down its refusals."""

    def __init__(self, log: Log) -> None:
        super().__init__()
        self._log = log

    async def take(self, key_id: str, *, now: float | None = None, **kw: Any) -> QuotaDecision:
        decision = await super().take(key_id, now=now, **kw)
        if not decision.allowed:
            assert now is not None
            self._log.add(now, "refused", (now, key_id), "quota")
        return decision


@dataclass
class SimRun:
    log: Log
    finished: dict[Who, tuple[float, Sample]]
    pressures: dict[float, float]


def run_simulator(text: str) -> SimRun:
    simulation = Simulation(parse_scenario(text, source="replay.toml"))
    log = Log()
    (replica,) = simulation._replicas  # the replay is of one gateway replica
    core = RecordingCore(replica.sched, log)
    replica.sched = cast(Scheduler, core)
    for backend in simulation._backends:
        backend.gpu = cast(Any, RecordingGpu(backend.gpu, log))
    for ts in simulation.tiers:
        if ts.quotas is not None:
            ts.quotas = RecordingQuotas(log)
    simulation.run()
    pressures = {at: float(d.rsplit(" ", 1)[1]) for at, what, _, d in log.entries if what == "tick"}
    return SimRun(log, core.finished, pressures)


async def run_service(text: str, tmp_path: Path, sim: SimRun) -> Log:
    """The schedule through the service's objects, with the simulator's backend played back."""
    scenario = parse_scenario(text, source="replay.toml")
    schedule = arrival_schedule(scenario)
    config = tmp_path / "gateway.toml"
    config.write_text(gateway_config(scenario, ["http://127.0.0.1:1"], schedule))
    settings = load_settings(config, env={})
    log = Log()
    controller = AIMDController(settings.controller)  # as Replica.start builds the core
    scheduler = Scheduler(
        SchedulerConfig(tuple(t.core for t in settings.tiers), settings.gate),
        controller,
        now=trio.current_time(),
    )
    core = RecordingCore(scheduler, log)
    dispatcher = Dispatcher(
        cast(Scheduler, core),
        tick_s=lambda: controller.config.tick_s,
        pressure=lambda: (sim.pressures.get(trio.current_time(), math.nan), trio.current_time()),
    )
    guard = QuotaGuard(None, ScopedBreakers(), replicas=1, timeout=AdaptiveTimeout(0.05))
    ids = iter(range(1, len(schedule) + 1))

    async def one(at_s: float, tier_name: str, key: str, prompt: int, output: int) -> None:
        await trio.sleep_until(at_s)
        tier = settings.tier(tier_name)
        call = InferenceCall("completions", "m", False, prompt, output, {})
        now = trio.current_time()
        verdict = await guard.check(  # Gateway._take_quota
            key, tier.quotas, tier.fail_mode, token_cost=int(call.cost), now=now
        )
        if not verdict.allowed:
            log.add(now, "refused", (now, key), "quota")
            return
        hold = guard.hold(key, tier.quotas, verdict, reserved=int(call.cost))
        request = Request(next(ids), key, tier_name, key, "m", call.cost, now)  # _schedule
        decision = await dispatcher.wait_decision(dispatcher.submit(request))
        if isinstance(decision, Shed):  # the ladder is ["reject"]: a 503, the quota back
            if hold is not None:
                hold.settle(used=0, failed=True, now=trio.current_time())
            return
        # the fake backend: the simulator's end of this request (a request the simulator
        # did not admit has diverged already: it ends a second later, dropped)
        end_at, sample = sim.finished.get(_who(request), (now + 1.0, Sample(1.0, Outcome.DROPPED)))
        await trio.sleep_until(end_at)
        dispatcher.finish(decision.ticket, sample)  # Gateway._ended, then Job.settle_ended
        if hold is not None:
            failed = sample.outcome is not Outcome.COMPLETED
            hold.settle(used=0 if failed else prompt + output, failed=failed, now=end_at)

    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        async with trio.open_nursery() as requests:
            for a in schedule:
                args = (a.at_s, a.tier, a.key, a.prompt_tokens, a.output_tokens)
                requests.start_soon(one, *args)
        nursery.cancel_scope.cancel()
    return log


def by_instant(entries: list[Entry], until: float) -> list[Entry]:
    """The log up to `until`, each instant's decisions sorted (see the module's docstring)."""
    return sorted(e for e in entries if e[0] <= until)


async def test_every_decision_is_the_services(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sim = run_simulator(SCENARIO)
    service = await run_service(SCENARIO, tmp_path, sim)
    decided = [e[0] for e in sim.log.entries if e[1] != "tick"]
    until = max(decided)  # past the last decision only ticks remain; each side stops apart
    expected, got = by_instant(sim.log.entries, until), by_instant(service.entries, until)

    kinds = {
        (what, detail.split(" ")[0] if what == "tick" else detail)
        for _, what, _, detail in expected
    }
    # every decision acts in this schedule: quota refusals, admissions at once and after a
    # wait, queueing, shedding for each reason, and a controller that moves both ways
    assert {("refused", "quota"), ("admit", ""), ("admit", "after a wait"), ("queue", "")} <= kinds
    sheds = {"deadline", "queue_full", "overload", "predicted_wait"}
    assert {("shed", reason) for reason in sheds} <= kinds
    limits = [float(d.split(" ")[0]) for _, what, _, d in expected if what == "tick"]
    assert any(b > a for a, b in itertools.pairwise(limits))
    assert any(b < a for a, b in itertools.pairwise(limits))
    assert all(s.outcome is Outcome.COMPLETED for _, s in sim.finished.values())  # no drops

    for i, (mine, theirs) in enumerate(zip(got, expected, strict=False)):
        assert mine == theirs, f"decision {i} of {len(expected)}: service {mine}, sim {theirs}"
    assert len(got) == len(expected)
    assert all(e[1] == "tick" for e in service.entries if e[0] > until)
