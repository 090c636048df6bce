"""The engine's mutable records: one per tier (counts, latencies, the key quota) and one per
backend (its GPU model, what it holds, when it next finishes).

Plain classes with `__slots__` and public fields: the loop touches them millions of times,
so they are records, not objects with behaviour behind properties.
"""

from __future__ import annotations

import math
from array import array

from policies.ladder import ShedLadder
from policies.ratelimit import Quota
from scheduler.core import Scheduler, ShedReason, Ticket
from scheduler.core.memory_quota import MemoryQuotaStore
from scheduler.core.quota_store import (
    AlgorithmKind,
    LayerName,
    QuotaLayer,
    Reservation,
    completed,
)
from scheduler.core.quota_store import QuotaSpec as StoreSpec
from scheduler.models.gpu import GpuConfig, GpuModel
from scheduler.models.pressure import PressureConfig, PressureModel, Scrape, pool_pressure
from sim.engine.model import QuotaAlgorithm, QuotaSpec, QuotaUnit, TierSpec
from sim.engine.results import Percentiles, TierResult, jain_index

_INF = math.inf


_ALGORITHMS: dict[QuotaAlgorithm, AlgorithmKind] = {
    QuotaAlgorithm.GCRA: "gcra",
    QuotaAlgorithm.SLIDING_LOG: "sliding_log",
    QuotaAlgorithm.SLIDING_COUNTER: "sliding_counter",
}


def quota_specs(spec: QuotaSpec) -> tuple[StoreSpec | None, StoreSpec | None]:
    """The tier's quota as the service's (request quota, token quota) pair."""
    store_spec = StoreSpec(
        _ALGORITHMS[spec.algorithm], Quota(spec.limit, spec.period_s, spec.burst)
    )
    return (store_spec, None) if spec.unit is QuotaUnit.REQUESTS else (None, store_spec)


def quota_layer(name: LayerName, scope: str, spec: QuotaSpec) -> QuotaLayer:
    """A tenant's or the model's quota as the service's shared layer."""
    requests, tokens = quota_specs(spec)
    return QuotaLayer(name, scope, requests, tokens)


class SharedQuotas:
    """The quota store every tier's keys share (the model's quota is all of theirs, as the
    service's Redis is), and the model's layer."""

    __slots__ = ("model", "store")

    def __init__(self, model_quota: QuotaSpec | None = None) -> None:
        self.store = MemoryQuotaStore()
        self.model = quota_layer("model", "sim", model_quota) if model_quota else None


class TierState:
    """One tier's config slice and its running counts."""

    __slots__ = (
        "admitted",
        "cache",
        "cache_ratio",
        "completed",
        "dropped",
        "fallback",
        "first_shed_at",
        "goodput",
        "index",
        "key_completed",
        "key_names",
        "key_offered",
        "ladder",
        "last",
        "latencies",
        "layers",
        "max_wait_s",
        "model",
        "name",
        "offered",
        "output_sum",
        "prompt_sum",
        "quota_requests",
        "quota_tokens",
        "quotas",
        "reasons",
        "refused",
        "shed",
        "shed_waits",
        "shed_zero_waits",
        "slo",
        "spec",
        "waits",
        "zero_waits",
    )

    def __init__(
        self, index: int, spec: TierSpec, key_names: list[str], shared: SharedQuotas | None = None
    ) -> None:
        self.index = index
        self.spec = spec
        self.name = spec.name
        self.slo = spec.slo_latency_s
        self.max_wait_s = spec.max_wait_s
        self.ladder: ShedLadder = spec.ladder
        self.cache_ratio = spec.cache_hit_ratio
        shared = shared or SharedQuotas()
        layered = spec.tenant_quota is not None or shared.model is not None
        self.quotas = shared.store if spec.quota is not None or layered else None
        self.layers: dict[str, tuple[QuotaLayer, ...]] = {}  # each key's, once seen
        self.model = shared.model
        self.quota_requests, self.quota_tokens = (
            quota_specs(spec.quota) if spec.quota is not None else (None, None)
        )
        self.key_names = key_names  # shared with the tier's arrivals, which may add trace keys
        self.key_offered = [0] * len(key_names)
        self.key_completed = [0] * len(key_names)
        self.offered = self.admitted = self.completed = self.goodput = 0
        self.refused = self.shed = self.cache = self.fallback = self.dropped = 0
        self.prompt_sum = self.output_sum = 0
        self.reasons = dict.fromkeys(ShedReason, 0)
        self.first_shed_at = _INF
        self.latencies: array[float] = array("d")
        self.waits: array[float] = array("d")  # queue waits > 0 (most are 0: counted apart)
        self.zero_waits = 0
        self.shed_waits: array[float] = array("d")  # arrival to shed, when > 0
        self.shed_zero_waits = 0
        self.last = (0, 0, 0, 0)  # offered, admitted, goodput, not served: at the last sample

    def take_quota(self, key: str, tokens: int, now: float) -> bool:
        """The key's quota decision, as the service's guard takes it: 1 request and `tokens`
        reserved (the sim knows the true size) on the key's own quota, its tenant's and the
        model's, all or none, no burst credits."""
        if self.quotas is None:
            return True
        take = self.quotas.take(
            key,
            requests=self.quota_requests,
            tokens=self.quota_tokens,
            token_cost=tokens,
            burst_credits=False,
            now=now,
            layers=self.layers_of(key),
        )
        return completed(take).allowed

    def give_back(self, key: str, tokens: int, now: float) -> None:
        """A request that got no answer (a 503 or a dropped call) settles as `failed`, as the
        gateway settles it: the request and its reserved tokens go back, on every layer."""
        if self.quotas is None:
            return
        reservation = Reservation(
            key, self.quota_requests, self.quota_tokens, tokens, layers=self.layers_of(key)
        )
        completed(reservation.settle(self.quotas, used=0, failed=True, now=now))

    def layers_of(self, key: str) -> tuple[QuotaLayer, ...]:
        """The shared layers `key` is counted on: its tenant's, then the model's."""
        layers = self.layers.get(key)
        if layers is None:
            spec = self.spec.tenant_quota
            found = [quota_layer("tenant", self.spec.tenant_of(key), spec)] if spec else []
            layers = self.layers[key] = (*found, *(m for m in (self.model,) if m))
        return layers

    def not_served(self) -> int:
        return self.shed + self.cache + self.fallback + self.dropped

    def grow_keys(self) -> None:
        """A trace brought new keys: widen the per-key counts."""
        missing = len(self.key_names) - len(self.key_offered)
        self.key_offered.extend([0] * missing)
        self.key_completed.extend([0] * missing)

    def result(self) -> TierResult:
        pairs = zip(self.key_completed, self.key_offered, strict=True)
        shares = [done / asked for done, asked in pairs if asked > 0]
        n = self.offered or 1
        return TierResult(
            name=self.name,
            slo_latency_s=self.slo,
            shed_budget=self.spec.shed_budget,
            offered=self.offered,
            admitted=self.admitted,
            completed=self.completed,
            goodput=self.goodput,
            refused_by_quota=self.refused,
            shed=self.shed,
            served_from_cache=self.cache,
            degraded_to_fallback=self.fallback,
            dropped=self.dropped,
            shed_reasons={r.value: c for r, c in self.reasons.items()},
            latency_s=Percentiles.of(self.latencies),
            queue_wait_s=Percentiles.of(self.waits, zeros=self.zero_waits),
            shed_wait_s=Percentiles.of(self.shed_waits, zeros=self.shed_zero_waits),
            fairness=jain_index(shares),
            first_shed_at=self.first_shed_at,
            mean_prompt_tokens=self.prompt_sum / n,
            mean_output_tokens=self.output_sum / n,
        )


Flight = tuple[Ticket, TierState, int, "Replica"]
"""An admitted request on a backend: its ticket, its tier, its key index, its replica."""


class Backend:
    """One GPU model, the requests it holds, and when the loop wakes it.

    It wakes when its next request finishes (`GpuModel.next_finish_at`), not for first
    tokens, which end nothing: waking for them would double the backend wake-ups.
    """

    __slots__ = ("alive", "config", "gpu", "index", "inflight", "pressure", "wake_at")

    def __init__(self, index: int, config: GpuConfig, now: float, probe: PressureConfig) -> None:
        self.index = index
        self.config = config
        self.gpu = GpuModel(config, now=now)
        self.alive = True
        self.pressure = PressureModel(probe)  # what the service's probe of this backend knows
        self.wake_at = _INF
        self.inflight: dict[int, Flight] = {}

    def reset(self, now: float) -> None:
        """Start over empty (a backend restored after a loss)."""
        self.gpu = GpuModel(self.config, now=now)
        self.inflight.clear()
        self.wake_at = _INF


def probe_config(gpu: GpuConfig, tick_s: float) -> PressureConfig:
    """The probe the simulated gateway has on each backend, scraped every tick: stale after
    four ticks (2 s at least), a full batch waiting reads as saturated. The one source: the
    fidelity rig configures the live gateway's probe from it
    (`bench.fidelity_schedule.gateway_config`)."""
    return PressureConfig(
        waiting_saturation=float(gpu.max_batch), stale_after_s=max(2.0, 4 * tick_s)
    )


def scrape(backends: list[Backend], now: float) -> float:
    """The pool's 0..1 pressure as the service's probes read it: each live backend is
    scraped (its GPU model's KV-cache use, waiting and running, the numbers the demo server
    exports); a lost one is not, and `pool_pressure` leaves it out as out of rotation."""
    for backend in backends:
        if backend.alive:
            gpu = backend.gpu  # its numbers without a whole `statistics()`: every tick
            waiting = gpu.waiting_seen(now)
            backend.pressure.observe(
                Scrape(at=now, kv_usage=gpu.kv_usage, waiting=waiting, running=gpu.running)
            )
    readings = [b.pressure.reading(now=now) for b in backends]
    return pool_pressure(readings, routed=[b.alive for b in backends])


class Replica:
    """One gateway replica: its own scheduling core (queue, gate, controller) over the shared
    backends, the arrivals it queued, when it next wakes, and its in-flight at the last scrape
    (what it has added since, the scrape could not see)."""

    __slots__ = ("index", "info", "sched", "scraped_inflight", "wake_at")

    def __init__(self, index: int, sched: Scheduler) -> None:
        self.index = index
        self.sched = sched
        self.info: dict[int, tuple[TierState, int, int, int]] = {}  # queued: tier, key, sizes
        self.wake_at = _INF
        self.scraped_inflight = 0

    def unseen(self) -> int:
        """In flight beyond what the last scrape saw. A request admitted in place of one that
        ended since adds no load the scrape missed, so this is the growth, not admissions."""
        return max(0, self.sched.gate.inflight - self.scraped_inflight)
