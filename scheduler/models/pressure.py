"""GPU pressure of one backend, from its scraped metrics: a pure model told the time.

Why a model apart from the probe: the probe only fetches and parses; what the numbers mean,
how old is too old and how several signals combine is decided here, in plain code that tests
and the simulator drive with explicit times.

How a scrape becomes a pressure in [0, 1] (1 = saturated, the controller backs off above its
`pressure_threshold`), each enabled signal scaled to its own saturation point:

    kv_cache     KV-cache usage / kv_saturation                     (vLLM, SGLang)
    waiting      waiting requests / waiting_saturation              (every engine's queue)
    gpu_memory   max GPU memory fraction / memory_saturation        (Triton, DCGM, NVML)
                 only when the scrape has no KV-cache usage: vLLM and TGI preallocate ~90 % of
                 GPU memory, so beside a KV-cache signal it reads "nearly full" whatever the load
    preemption   preemptions per second between the last two good scrapes
                 / preemption_saturation_per_s                      (vLLM, SGLang)

The pressure is the largest of them, not a weighted sum: any one of them alone means the
server cannot take more (a full KV cache with an empty queue is still full).

Stale data counts as saturated: before the first good scrape, and once the last good scrape is
older than `stale_after_s`, the pressure is 1.0. A failed scrape brings no new data, so one
dropped scrape changes nothing and a backend that keeps failing turns stale `stale_after_s`
after its last good scrape.

A backend that answers but shows none of the enabled signals (none of the known exporters, or a
server without `/metrics`) is reported as `known=False` with pressure 0.0: it tells us nothing
either way, and a pool leaves it out of its aggregate rather than count it as idle or full.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields


class Signal(enum.Enum):
    """A pressure signal the model can use."""

    KV_CACHE = "kv_cache"
    WAITING = "waiting"
    GPU_MEMORY = "gpu_memory"
    PREEMPTION = "preemption"


ALL_SIGNALS: frozenset[Signal] = frozenset(Signal)


@dataclass(frozen=True, slots=True)
class PressureConfig:
    """How one backend's metrics turn into pressure."""

    signals: frozenset[Signal] = ALL_SIGNALS
    waiting_saturation: float = 8.0  # waiting requests that count as pressure 1.0
    kv_saturation: float = 1.0  # KV-cache usage (0..1) that counts as pressure 1.0
    memory_saturation: float = 1.0  # GPU memory fraction that counts as pressure 1.0
    preemption_saturation_per_s: float = 1.0  # preemptions per second that count as 1.0
    stale_after_s: float = 2.0  # older data counts as saturated

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"pressure.{name} {rule}, got {getattr(self, name)!r}")

        need(
            bool(self.signals) and all(isinstance(s, Signal) for s in self.signals),
            "signals",
            f"must name at least one of {sorted(s.value for s in Signal)}",
        )
        for name in ("waiting_saturation", "preemption_saturation_per_s", "stale_after_s"):
            value = getattr(self, name)
            need(0 < value < math.inf, name, "must be > 0 and finite")
        for name in ("kv_saturation", "memory_saturation"):
            need(0 < getattr(self, name) <= 1, name, "must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class Scrape:
    """The numbers one good scrape found (None: not exposed), taken at `at`.

    Sums and maxima are over label sets: `waiting`, `running` and `preemptions_total` are
    summed over models and engines; `kv_usage` and `gpu_memory` are the fullest engine or GPU.
    """

    at: float
    kv_usage: float | None = None  # 0..1
    waiting: float | None = None  # requests
    running: float | None = None  # requests (shown, not a signal)
    gpu_memory: float | None = None  # 0..1, the fullest GPU
    preemptions_total: float | None = None  # a counter

    def __post_init__(self) -> None:
        for name in _SCRAPE_VALUES:
            value = getattr(self, name)
            if value is not None and not value >= 0:  # also refuses NaN
                raise ValueError(f"scrape.{name} must be >= 0, got {value!r}")

    @property
    def known(self) -> bool:
        """Whether the scrape found any metric the model understands."""
        return any(getattr(self, name) is not None for name in _SCRAPE_VALUES)


_SCRAPE_VALUES = tuple(f.name for f in fields(Scrape) if f.name != "at")


@dataclass(frozen=True, slots=True)
class PressureReading:
    """A snapshot of one backend's pressure, for the controller and `statistics()`."""

    pressure: float  # 0..1, what the controller sees
    stale: bool  # no good scrape yet, or the last one older than stale_after_s
    known: bool  # the backend shows at least one enabled signal
    age_s: float  # since the last good scrape; inf before the first
    failures: int  # failed scrapes since the last good one
    last_error: str | None  # why the last scrape failed, while failures > 0
    signals: dict[Signal, float] = field(default_factory=dict)  # each counted signal, 0..1
    preemptions_per_s: float | None = None
    scrape: Scrape | None = None  # the last good scrape


def _scaled(value: float, saturation: float) -> float:
    return min(1.0, value / saturation)


class PressureModel:
    """One backend's pressure: feed it scrapes and failures, ask it with `now`."""

    def __init__(self, config: PressureConfig | None = None) -> None:
        self._config = config or PressureConfig()
        self._last: Scrape | None = None
        self._previous: Scrape | None = None
        self._failures = 0
        self._last_error: str | None = None

    @property
    def config(self) -> PressureConfig:
        return self._config

    def configure(self, config: PressureConfig) -> None:
        """Change the rules live; the scrapes seen so far are kept."""
        self._config = config

    def observe(self, scrape: Scrape) -> None:
        """A good scrape. One older than the last good one is ignored."""
        if self._last is not None and scrape.at < self._last.at:
            return
        self._previous, self._last = self._last, scrape
        self._failures = 0
        self._last_error = None

    def observe_failure(self, error: str) -> None:
        """A scrape that brought no data: it changes nothing until the data turns stale."""
        self._failures += 1
        self._last_error = error

    def preemptions_per_s(self) -> float | None:
        """The preemption rate between the last two good scrapes; None without two, or
        across a counter reset (a restarted server)."""
        last, previous = self._last, self._previous
        if last is None or previous is None:
            return None
        if last.preemptions_total is None or previous.preemptions_total is None:
            return None
        delta = last.preemptions_total - previous.preemptions_total
        elapsed_s = last.at - previous.at
        if not (math.isfinite(delta) and delta >= 0 and elapsed_s > 0):
            return None
        return delta / elapsed_s

    def signals(self) -> dict[Signal, float]:
        """Each enabled signal the last good scrape shows, scaled to 0..1."""
        cfg, scrape = self._config, self._last
        if scrape is None:
            return {}
        found: dict[Signal, float] = {}
        if scrape.kv_usage is not None:
            found[Signal.KV_CACHE] = _scaled(scrape.kv_usage, cfg.kv_saturation)
        if scrape.waiting is not None:
            found[Signal.WAITING] = _scaled(scrape.waiting, cfg.waiting_saturation)
        use_memory = scrape.kv_usage is None or Signal.KV_CACHE not in cfg.signals
        if scrape.gpu_memory is not None and use_memory:
            found[Signal.GPU_MEMORY] = _scaled(scrape.gpu_memory, cfg.memory_saturation)
        rate = self.preemptions_per_s()
        if rate is not None:
            found[Signal.PREEMPTION] = _scaled(rate, cfg.preemption_saturation_per_s)
        elif scrape.preemptions_total is not None:
            found[Signal.PREEMPTION] = 0.0  # the counter is there; a rate needs two scrapes
        return {s: v for s, v in found.items() if s in cfg.signals}

    def is_stale(self, *, now: float) -> bool:
        last = self._last
        return last is None or now - last.at > self._config.stale_after_s

    def pressure(self, *, now: float) -> float:
        """0..1: 1.0 when stale, else the largest enabled signal (0.0 when none is known)."""
        if self.is_stale(now=now):
            return 1.0
        return max(self.signals().values(), default=0.0)

    def reading(self, *, now: float) -> PressureReading:
        signals = self.signals()
        last = self._last
        stale = self.is_stale(now=now)
        return PressureReading(
            pressure=1.0 if stale else max(signals.values(), default=0.0),  # self.pressure()
            stale=stale,
            known=bool(signals),
            age_s=math.inf if last is None else max(0.0, now - last.at),
            failures=self._failures,
            last_error=self._last_error,
            signals=signals,
            preemptions_per_s=self.preemptions_per_s(),
            scrape=last,
        )


class Aggregate(enum.Enum):
    """How a pool combines its backends' pressures (see `pool_pressure`)."""

    MEAN = "mean"
    MAX = "max"


def pool_pressure(
    readings: Sequence[PressureReading],
    aggregate: Aggregate = Aggregate.MEAN,
    *,
    routed: Sequence[bool] | None = None,
) -> float:
    """A pool's pressure from its backends' readings: the service's and the simulator's.

    Backends that are fresh but show no known signal are left out; a stale one counts as 1.0;
    with none left, the pressure is 0.0. `routed[i]` false says backend i is out of rotation
    (ejected, or lost in the simulator): it takes no requests, so it is left out too, and its
    staleness is no pressure on the backends that do take them; a pool with none in rotation
    reads 0.0 (its requests fail fast, and one model down must not hold the controller's one
    limit, every model's, at its floor). The mean by default: the controller's one limit
    covers the whole pool and least-busy routing spreads load, so the mean is the share of the
    pool that is saturated, and a backend that is stale but still routed weighs 1/N instead of
    throttling the others to the minimum, which the max would do. `Aggregate.MAX` is for pools
    where one hot backend must hold everyone back.
    """
    if routed is not None:
        readings = [r for r, in_rotation in zip(readings, routed, strict=True) if in_rotation]
    counted = [r.pressure for r in readings if r.known or r.stale]
    if not counted:
        return 0.0
    if aggregate is Aggregate.MAX:
        return max(counted)
    return min(1.0, math.fsum(counted) / len(counted))
