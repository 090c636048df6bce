"""The scenario as plain values: what the engine needs, already validated and typed.

Why a separate model: the TOML loader (`sim.scenario`) owns files, field paths and line numbers;
the engine only sees these frozen values, so sweeps and tests build or `replace` them directly.
Every rule checked here names the field the way the TOML file spells it.
"""

from __future__ import annotations

import enum
import math
import zlib
from dataclasses import dataclass, field

from policies.ladder import ShedLadder
from scheduler.core import AIMDConfig, GateMode, GradientConfig
from scheduler.models.gpu import GpuConfig


class SizeKind(enum.Enum):
    FIXED = "fixed"
    LOGNORMAL = "lognormal"
    UNIFORM = "uniform"


@dataclass(frozen=True, slots=True)
class SizeDist:
    """Token counts: `fixed` at `mean`; `lognormal` with that mean and shape `sigma`;
    `uniform` over [min, max]. Always rounded and clamped to [min, max]."""

    kind: SizeKind = SizeKind.FIXED
    mean: float = 100.0
    sigma: float = 0.5
    min: int = 1
    max: int = 1 << 20


@dataclass(frozen=True, slots=True)
class Spike:
    """Multiply the arrival rate by `factor` during [at_s, at_s + duration_s).
    `tiers` empty means every tier."""

    at_s: float
    duration_s: float
    factor: float
    tiers: tuple[str, ...] = ()

    @property
    def end_s(self) -> float:
        return self.at_s + self.duration_s


@dataclass(frozen=True, slots=True)
class Diurnal:
    """A rate multiplier curve: (t_s, multiplier) points, linear in between, repeating every
    `period_s`. The curve wraps from the last point back to the first."""

    points: tuple[tuple[float, float], ...]
    period_s: float = 86_400.0
    tiers: tuple[str, ...] = ()


class Process(enum.Enum):
    POISSON = "poisson"
    TRACE = "trace"


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One recorded arrival; a missing key or size is drawn from the tier's distributions."""

    at_s: float
    key: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Arrivals:
    process: Process = Process.POISSON
    rate_rps: float = 1.0
    trace: tuple[TraceRecord, ...] = ()


class QuotaAlgorithm(enum.Enum):
    GCRA = "gcra"
    SLIDING_LOG = "sliding_log"
    SLIDING_COUNTER = "sliding_counter"


class QuotaUnit(enum.Enum):
    REQUESTS = "requests"
    TOKENS = "tokens"


@dataclass(frozen=True, slots=True)
class QuotaSpec:
    """Each key of the tier may take `limit` units per `period_s` (burst: GCRA's bucket)."""

    limit: int
    period_s: float
    burst: int | None = None
    algorithm: QuotaAlgorithm = QuotaAlgorithm.SLIDING_LOG
    unit: QuotaUnit = QuotaUnit.REQUESTS


@dataclass(frozen=True, slots=True)
class TierSpec:
    """One tier: its share and bounds for the core, its traffic, and its targets."""

    name: str
    weight: float
    max_wait_s: float
    max_depth: int
    slo_latency_s: float
    arrivals: Arrivals
    shed_on_overload: bool = False
    fail_fast: bool = False
    priority: int = 0
    floor: float = 0.0
    protect_latency_s: float = 0.0
    keys: int = 100
    key_skew: float = 1.0
    prompt_tokens: SizeDist = field(default_factory=SizeDist)
    output_tokens: SizeDist = field(default_factory=SizeDist)
    ladder: ShedLadder = field(default_factory=ShedLadder)
    cache_hit_ratio: float = 0.0
    quota: QuotaSpec | None = None
    shed_budget: float = 0.01
    tenants: int = 0  # how many tenants the keys belong to (0: each key its own)
    tenant_quota: QuotaSpec | None = None  # each tenant's, all its keys together

    def tenant_of(self, key: str) -> str:
        """`key`'s tenant: one of `tenants`, by a stable hash of its name (or its own)."""
        if not self.tenants:
            return key
        return f"{self.name}-t{zlib.crc32(key.encode()) % self.tenants}"


@dataclass(frozen=True, slots=True)
class BackendPool:
    count: int
    gpu: GpuConfig = field(default_factory=GpuConfig)


@dataclass(frozen=True, slots=True)
class CapacityEvent:
    """`backends` of the pool are lost at `at_s`, and come back (empty) at `restore_at_s`."""

    at_s: float
    backends: int = 1
    restore_at_s: float = math.inf


class ControllerKind(enum.Enum):
    AIMD = "aimd"
    FIXED = "fixed"
    GRADIENT = "gradient"


@dataclass(frozen=True, slots=True)
class ControllerSpec:
    """Which controller sets the gate's limit, the gate's mode, and every gain."""

    kind: ControllerKind = ControllerKind.AIMD
    mode: GateMode = GateMode.WINDOW
    burst_s: float = 0.05
    aimd: AIMDConfig = field(default_factory=AIMDConfig)
    gradient: GradientConfig = field(default_factory=GradientConfig)
    fixed_limit: float = 64.0
    rate_aimd: AIMDConfig | None = None  # gains for rate mode in comparisons (else derived)

    @property
    def tick_s(self) -> float:
        if self.kind is ControllerKind.GRADIENT:
            return self.gradient.tick_s
        return self.aimd.tick_s

    @property
    def label(self) -> str:
        return f"{self.kind.value}-{self.mode.value}"


@dataclass(frozen=True, slots=True)
class Scenario:
    """Everything one simulation run needs."""

    name: str
    duration_s: float
    tiers: tuple[TierSpec, ...]
    backends: BackendPool
    controller: ControllerSpec = field(default_factory=ControllerSpec)
    seed: int = 1
    sample_s: float = 1.0
    spikes: tuple[Spike, ...] = ()
    diurnal: Diurnal | None = None
    capacity_events: tuple[CapacityEvent, ...] = ()
    fallback: BackendPool | None = None
    compare: tuple[ControllerSpec, ...] = ()
    replicas: int = 1  # gateway replicas, each with its own core and controller
    scrape_age_s: float = 0.0  # how old the pressure is when the controller ticks
    model_quota: QuotaSpec | None = None  # the model's, every tier's keys together

    def tier(self, name: str) -> TierSpec:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(f"unknown tier {name!r}")

    @property
    def offered_rps(self) -> float:
        """The mean offered rate over the run without spikes or the diurnal curve."""
        return sum(t.arrivals.rate_rps for t in self.tiers if t.arrivals.process is Process.POISSON)
