"""Prometheus metrics of one gateway process, and how `/metrics` renders them.

Why two modes: `--workers N` runs N processes behind one port, so a scrape lands on any one
of them and must still see all of them.

- Single process (`PROMETHEUS_MULTIPROC_DIR` unset; tests, `--workers 1`): each
  `GatewayMetrics` owns a private `CollectorRegistry`, so several gateways in one process
  (the tests start many) never share a series; the global registry is not used.
- Multiprocess (`PROMETHEUS_MULTIPROC_DIR` set in the parent before the workers are spawned,
  see `multiprocess_dir`): prometheus_client writes every value to per-process mmap files in
  that directory, and `render` merges them all with a `MultiProcessCollector`. Counters and
  histograms are summed. Gauges merge by what they mean for the fleet: queue depth, in-flight
  and the controller's limit (and its bounds) are summed over live workers (`livesum`: "limit
  vs in-flight" stays comparable), the latency signal, pressure and the congestion flag take
  the worst live worker (`livemax`), Redis up the worst too (`livemin`), the breaker the most
  open (`livemax`), and per-tier config values are the same everywhere (`max`). A worker
  calls `close()` on shutdown so its live gauges leave the merge; for one that died, the
  supervisor does it (`mark_process_dead`).

Series stay bounded: labels are configured tiers, models and routes (anything else is
counted as `other`) and fixed enums; never an API key or a tenant.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from backends.http.client import (
    REFUSED_CREDENTIALS,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
)
from policies.breaker import BreakerState
from scheduler.core import SchedulerStats, ShedReason
from scheduler.core.fairness import FairnessWindow
from scheduler.core.quota_store import LayerName

if TYPE_CHECKING:
    from scheduler.core import AIMDConfig
    from scheduler.service.config import Settings
    from scheduler.service.quota import FailMode

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "scheduler_"  # of every series
OTHER = "other"  # the label of a tier, model or route that is not configured
REQUEST_SERIES_MAX = 4096  # (tier, route, model, outcome) combinations remembered

RequestOutcome = Literal[
    "admitted",
    "queued_admitted",
    "bypass",
    "shed_cache",
    "shed_fallback",
    "refused_quota",
    "refused_overload",
    "refused_redis_down",
    "error",
]
BackendErrorKind = Literal["timeout", "unavailable", "saturated", "bad_gateway", "auth"]
GaugeMode = Literal["livesum", "livemax", "livemin", "max"]  # how workers' values merge
OUTCOMES: tuple[RequestOutcome, ...] = get_args(RequestOutcome)
BACKEND_ERROR_KINDS: tuple[BackendErrorKind, ...] = get_args(BackendErrorKind)
SERVED: frozenset[RequestOutcome] = frozenset(
    {"admitted", "queued_admitted", "bypass", "shed_cache", "shed_fallback"}
)
ROUTES = ("chat", "completions", "responses", "embeddings")
# the shadow refusals' series made at 0: a shared layer has no concurrency cap (the key's own)
_WOULD_REFUSE: tuple[tuple[LayerName, str], ...] = (
    *((layer, quota) for layer in ("key", "tenant", "model") for quota in ("requests", "tokens")),
    ("key", "concurrency"),
)
BASE_BUCKETS_S = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SLO_MULTIPLES = (0.1, 0.25, 0.5, 1.0, 2.0)
FAIRNESS_WINDOW_S = 30.0  # the recent window of each tier's Jain's index
BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def slo_buckets(targets_s: Iterable[float]) -> tuple[float, ...]:
    """Histogram bounds: the base set plus 0.1, 0.25, 0.5, 1 and 2 times each target."""
    bounds = set(BASE_BUCKETS_S)
    for target in targets_s:
        bounds.update(round(target * m, 6) for m in SLO_MULTIPLES)
    return tuple(sorted(b for b in bounds if b > 0 and math.isfinite(b)))


def backend_error_kind(
    error: BaseException | None = None, *, status: int = 0
) -> BackendErrorKind | None:
    """How a backend call failed, for `backend_error`: from the exception or the status."""
    if isinstance(error, BackendTimeout):
        return "timeout"
    if isinstance(error, BackendUnavailable):
        return "unavailable"
    if isinstance(error, BackendError):
        return "bad_gateway"  # the response broke off
    if status in (429, 503):
        return "saturated"
    if status in REFUSED_CREDENTIALS:
        return "auth"  # the backend refused the gateway's own credentials
    if status >= 500:
        return "bad_gateway"
    return None


@contextmanager
def multiprocess_dir() -> Iterator[str]:
    """A fresh directory for the workers' metric files, in `PROMETHEUS_MULTIPROC_DIR`.

    Enter it in the parent before the workers are forked; it is removed (and the variable
    restored) on exit, so no run ever merges a previous run's files. prometheus_client picks
    its value class from the variable when imported, which the parent did long before: it is
    picked again here, so that the forked workers write their metrics to files.
    """
    path = tempfile.mkdtemp(prefix="scheduler-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = path
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class TierTargets:
    """What a tier promises: the buckets are built around these."""

    name: str
    slo_s: float
    max_wait_s: float


class GatewayMetrics:
    """Every metric of one gateway process; see the module docstring for the two modes."""

    def __init__(
        self,
        tiers: Sequence[TierTargets],
        models: Sequence[str],
        *,
        routes: Sequence[str] = ROUTES,
    ) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        if self.multiprocess_dir and values.ValueClass is values.MutexValue:
            raise RuntimeError(
                f"{MULTIPROC_ENV} was set after prometheus_client was imported: "
                "set it before the worker processes start"
            )
        self._tiers = tuple(t.name for t in tiers)
        self._models = frozenset(models)
        self._routes = frozenset(routes)
        self._request_series: dict[tuple[str, str, str, str], tuple[Any, Any, Any | None]] = {}
        self.buckets = slo_buckets([t.slo_s for t in tiers] + [t.max_wait_s for t in tiers])
        self._registry = CollectorRegistry()
        self._build()
        self._seen_shed: dict[tuple[str, str], int] = {}
        self._seen_adjustments = {"increase": 0, "decrease": 0}
        self._seen_redis_errors = 0
        self.fairness = FairnessWindow(FAIRNESS_WINDOW_S)
        for t in tiers:
            self._tier_slo.labels(t.name).set(t.slo_s)
            self._tier_max_wait.labels(t.name).set(t.max_wait_s)
        self._zero_series(routes)

    @classmethod
    def from_settings(cls, settings: Settings) -> GatewayMetrics:
        tiers = [TierTargets(t.core.name, t.slo_s, t.core.max_wait_s) for t in settings.tiers]
        metrics = cls(tiers, [m.name for m in settings.models])
        metrics.controller_config(settings.controller)
        return metrics

    def _counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(PREFIX + name, doc, labels, registry=self._registry)

    def _gauge(self, name: str, doc: str, mode: GaugeMode, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(PREFIX + name, doc, labels, registry=self._registry, multiprocess_mode=mode)

    def _histogram(self, name: str, doc: str, labels: Sequence[str]) -> Histogram:
        return Histogram(PREFIX + name, doc, labels, registry=self._registry, buckets=self.buckets)

    def _build(self) -> None:
        """Every series, in the order `/metrics` shows them."""
        self._build_requests()
        self._build_controller()
        self._build_faults()

    def _build_requests(self) -> None:
        self._requests = self._counter(
            "requests", "Requests answered, by outcome.", ("tier", "route", "model", "outcome")
        )
        self._shed = self._counter(
            "shed", "Requests the scheduler shed, by reason.", ("tier", "reason")
        )
        self._queue_wait = self._histogram(
            "queue_wait_seconds", "Time spent in the scheduler's queue.", ("tier",)
        )
        self._duration = self._histogram(
            "request_duration_seconds",
            "End-to-end time of served requests (to the last byte of a stream).",
            ("tier", "route"),
        )
        self._depth = self._gauge("queue_depth", "Requests queued.", "livesum", ("tier",))
        self._inflight = self._gauge("inflight", "Requests admitted and not finished.", "livesum")
        self._fairness = self._gauge(
            "tier_fairness_index",
            f"Jain's index of the tier's keys' served tokens over their max-min fair shares, "
            f"over the last {FAIRNESS_WINDOW_S:g} s (1: fair; 1/n: one key took all).",
            "livemin",
            ("tier",),
        )
        self._fairness_keys = self._gauge(
            "tier_fairness_keys",
            "Keys the tier's fairness index is over (those that asked in its window).",
            "livemax",
            ("tier",),
        )

    def _build_controller(self) -> None:
        """The controller's state and gains, then the tiers' targets they are compared with."""
        gauge = self._gauge
        self._limit = gauge("controller_limit", "The gate's limit.", "livesum")
        self._min_limit = gauge("controller_min_limit", "controller.min_limit.", "livesum")
        self._max_limit = gauge("controller_max_limit", "controller.max_limit.", "livesum")
        self._latency = gauge(
            "controller_latency_seconds",
            "The controller's latency signal at its percentile (0 before any sample).",
            "livemax",
        )
        self._target = gauge(
            "controller_target_latency_seconds", "controller.target_latency_s.", "livemax"
        )
        self._pressure = gauge("controller_pressure", "Backend pressure (0..1).", "livemax")
        self._threshold = gauge(
            "controller_pressure_threshold", "controller.pressure_threshold.", "livemax"
        )
        self._congested = gauge(
            "controller_congested", "1 while the controller sees congestion.", "livemax"
        )
        self._adjustments = self._counter(
            "controller_adjustments", "Limit changes by the controller.", ("direction",)
        )
        self._band_ceiling = gauge(
            "band_ceiling_slots",
            "Slots a priority band and the bands below it may hold (band 1: the second highest"
            " priority; the top band has no ceiling). Kept while lifted.",
            "livesum",
            ("band",),
        )
        self._tier_slo = gauge("tier_slo_seconds", "The tier's SLO.", "max", ("tier",))
        self._tier_max_wait = gauge(
            "tier_max_wait_seconds", "The tier's longest queue wait.", "max", ("tier",)
        )

    def _build_faults(self) -> None:
        """Backends and Redis failing, and what was decided without them."""
        counter = self._counter
        self._backend_errors = counter("backend_errors", "Failed backend calls.", ("model", "kind"))
        self._redis_errors = counter("redis_errors", "Failed Redis calls.")
        self._would_refuse = counter(
            "quota_would_refuse",
            "Requests a shadow quota (enforce = false) would have refused, admitted, by the "
            "binding layer (key, tenant, model: as x-ratelimit-layer-* names it).",
            ("tier", "layer", "reason"),
        )
        self._fail_mode = counter(
            "fail_mode_decisions",
            "Quota decisions taken without Redis, by the tier's fail mode.",
            ("tier", "mode"),
        )
        self._gains_rejected = counter(
            "gains_rejected",
            "Controller-gains documents in Redis that could not be applied (malformed).",
        )
        self._redis_up = self._gauge("redis_up", "1 while Redis answers.", "livemin")
        self._breaker = self._gauge(
            "breaker_state", "Redis breaker: 0 closed, 1 half-open, 2 open.", "livemax"
        )

    def _zero_series(self, routes: Sequence[str]) -> None:
        """Create the enum-labelled series at 0, so `rate()` sees their first increment."""
        for tier in self._tiers:
            self._queue_wait.labels(tier)
            self._depth.labels(tier)
            self._fairness.labels(tier).set(1.0)
            for reason in ShedReason:
                self._shed.labels(tier, reason.value)
            for mode in ("open", "closed"):
                self._fail_mode.labels(tier, mode)
            for layer, quota in _WOULD_REFUSE:
                self._would_refuse.labels(tier, layer, quota)
            for route in routes:
                self._duration.labels(tier, route)
        for model in self._models:
            for kind in BACKEND_ERROR_KINDS:
                self._backend_errors.labels(model, kind)
        for direction in self._seen_adjustments:
            self._adjustments.labels(direction)

    def _tier(self, tier: str) -> str:
        return tier if tier in self._tiers else OTHER

    # -- the request path -----------------------------------------------------------------

    def request_done(
        self,
        *,
        tier: str,
        route: str,
        model: str,
        outcome: RequestOutcome,
        latency_s: float,
        queue_wait_s: float | None,
    ) -> None:
        """Count one answered request. `queue_wait_s` is None when it never reached the
        queue; `latency_s` is observed only for outcomes that served a completion."""
        series = self._request_series.get((tier, route, model, outcome))
        if series is None:
            series = self._request_series_for(tier, route, model, outcome)
        requests, queue_wait, duration = series
        requests.inc()
        if queue_wait_s is not None:
            queue_wait.observe(max(0.0, queue_wait_s))
        if duration is not None:
            duration.observe(max(0.0, latency_s))

    def _request_series_for(
        self, tier: str, route: str, model: str, outcome: RequestOutcome
    ) -> tuple[Any, Any, Any | None]:
        """The series one answered request counts in, looked up once per combination (a
        labelled child costs microseconds to find, per request otherwise)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        shown = self._tier(tier)
        shown_route = route if route in self._routes else OTHER
        shown_model = model if model in self._models else OTHER
        series = (
            self._requests.labels(shown, shown_route, shown_model, outcome),
            self._queue_wait.labels(shown),
            self._duration.labels(shown, shown_route) if outcome in SERVED else None,
        )
        if len(self._request_series) < REQUEST_SERIES_MAX:  # bounded: names are the client's
            self._request_series[(tier, route, model, outcome)] = series
        return series

    def meter(self, *, tier: str, route: str, model: str, now: float) -> RequestMeter:
        """A request's tally, reported once by `RequestMeter.done`."""
        return RequestMeter(self, tier, route, model, now)

    def shed(self, tier: str, reason: ShedReason | str) -> None:
        reason = ShedReason(reason)
        self._shed.labels(self._tier(tier), reason.value).inc()

    def queue_decided(
        self, tier: str, key_id: str, *, cost: float, admitted: bool, now: float
    ) -> None:
        """A request of `key_id` left the queue, admitted or shed: for the fairness index."""
        if tier in self._tiers:
            self.fairness.record(tier, key_id, cost=cost, admitted=admitted, now=now)

    def backend_error(self, model: str, kind: BackendErrorKind) -> None:
        if kind not in BACKEND_ERROR_KINDS:
            raise ValueError(f"unknown backend error kind {kind!r}")
        self._backend_errors.labels(model if model in self._models else OTHER, kind).inc()

    def fail_mode_decision(self, tier: str, mode: FailMode) -> None:
        """A quota decision taken by the tier's fail mode because Redis was out."""
        self._fail_mode.labels(self._tier(tier), mode.value).inc()

    def quota_would_refuse(self, tier: str, layer: LayerName, reason: str) -> None:
        """A shadow quota of `layer` would have refused this request (`reason`: a refusal's
        reason)."""
        self._would_refuse.labels(self._tier(tier), layer, reason).inc()

    def gains_rejected(self) -> None:
        """A gains document from Redis was malformed and left unapplied."""
        self._gains_rejected.inc()

    # -- snapshots, every controller tick ------------------------------------------------

    def update_from(self, stats: SchedulerStats) -> None:
        """Set the gauges from the core's snapshot and count its new sheds."""
        for tier in stats.tiers:
            self._depth.labels(self._tier(tier.name)).set(tier.depth)
            for reason, total in tier.shed.items():
                key = (tier.name, reason)
                new = total - self._seen_shed.get(key, 0)
                if new > 0:
                    self._shed.labels(self._tier(tier.name), reason).inc(new)
                self._seen_shed[key] = total
        self._inflight.set(stats.gate.inflight)
        controller = stats.controller
        self._limit.set(controller.limit)
        if math.isfinite(controller.latency_s):
            self._latency.set(controller.latency_s)
        self._pressure.set(controller.pressure)
        self._congested.set(1 if controller.congested else 0)
        for band, ceiling in enumerate(stats.band_ceilings[1:], start=1):
            self._band_ceiling.labels(str(band)).set(ceiling)
        for direction, total in (
            ("increase", controller.increases),
            ("decrease", controller.decreases),
        ):
            new = total - self._seen_adjustments[direction]
            if new > 0:
                self._adjustments.labels(direction).inc(new)
            self._seen_adjustments[direction] = total

    def update_fairness(self, *, now: float) -> None:
        """Each tier's fairness index and its key count over the window ending `now`."""
        for tier in self._tiers:
            self._fairness.labels(tier).set(self.fairness.index(tier, now=now))
            self._fairness_keys.labels(tier).set(self.fairness.active_keys(tier, now=now))

    def controller_config(self, config: AIMDConfig) -> None:
        """Export the gains the panels compare against (call again after a live change)."""
        self._target.set(config.target_latency_s)
        self._threshold.set(config.pressure_threshold)
        self._min_limit.set(config.min_limit)
        self._max_limit.set(config.max_limit)

    def update_redis(self, *, errors_total: int, up: bool, breaker: BreakerState) -> None:
        """Mirror the quota guard: its running error count, Redis up, the breaker's state."""
        new = errors_total - self._seen_redis_errors
        if new > 0:
            self._redis_errors.inc(new)
        self._seen_redis_errors = errors_total
        self._redis_up.set(1 if up else 0)
        self._breaker.set(BREAKER_VALUES[breaker])

    # -- exposition ---------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The `/metrics` body and content type: this process, or every worker's files."""
        registry = self._registry
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4

    def close(self) -> None:
        """This worker is leaving: drop its live gauges from the merge (multiprocess only)."""
        if self.multiprocess_dir:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)  # type: ignore[no-untyped-call]


@dataclass(slots=True)
class RequestMeter:
    """One request's way through the gateway, reported once to `request_done`.

    The steps set `outcome` and `queue_wait_s` as they decide. A backend call's `on_end`
    calls `backend_done` (so a stream is timed to its last byte); the handler calls `fail`
    when it raises and `done` otherwise. Whichever comes first reports; the rest do nothing.
    """

    metrics: GatewayMetrics
    tier: str
    route: str
    model: str
    started_at: float
    outcome: RequestOutcome = "error"
    queue_wait_s: float | None = None
    reported: bool = False
    on_done: Callable[[], None] | None = None  # told once, when the request is reported

    def backend_done(self, *, model: str, error: BackendErrorKind | None, now: float) -> None:
        """A backend call for this request ended, failed if `error` says how."""
        if error is not None:
            self.metrics.backend_error(model, error)
            self.outcome = "error"
        self.done(now=now)

    def fail(self, *, now: float) -> None:
        """The handler raised: a refusal stays what it was, anything else is an error."""
        if self.outcome in SERVED:
            self.outcome = "error"
        self.done(now=now)

    def done(self, *, now: float) -> None:
        if self.reported:
            return
        self.reported = True
        if self.on_done is not None:
            self.on_done()
        self.metrics.request_done(
            tier=self.tier,
            route=self.route,
            model=self.model,
            outcome=self.outcome,
            latency_s=now - self.started_at,
            queue_wait_s=self.queue_wait_s,
        )
