"""A backend's pressure-probe config, and building it from a TOML table (pure: no I/O).

The TOML table is flat; every field is optional:

    enabled = true                      # false: no probe (a server without metrics)
    metrics_url = "http://gpu1:9400/metrics"   # default: <backend URL>/metrics
    interval_s = 0.5                    # between scrapes
    timeout_s = 1.0                     # one scrape
    exporters = ["vllm", "triton", "dcgm"]     # which metric families to read
    signals = ["kv_cache", "waiting", "gpu_memory", "preemption"]
    stale_after_s = 2.0                 # older data counts as saturated; > interval_s
    waiting_saturation = 8.0            # waiting requests that count as pressure 1.0
    kv_saturation = 1.0                 # KV-cache usage that counts as 1.0
    memory_saturation = 1.0             # GPU memory fraction that counts as 1.0
    preemption_saturation_per_s = 1.0   # preemptions per second that count as 1.0

Errors name the field under `where` (for example `models.llama.pressure.interval_s`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from scheduler.models.exposition import ALL_EXPORTERS, Exporter
from scheduler.models.pressure import PressureConfig, Signal

E = TypeVar("E", bound=enum.Enum)


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    """How one backend is probed, and how its metrics turn into pressure."""

    enabled: bool = True
    metrics_url: str | None = None  # None: the backend's URL + "/metrics"
    interval_s: float = 0.5
    timeout_s: float = 1.0
    exporters: frozenset[Exporter] = ALL_EXPORTERS
    pressure: PressureConfig = dataclasses.field(default_factory=PressureConfig)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str, value: object) -> None:
            if not ok:
                raise ValueError(f"pressure.{name} {rule}, got {value!r}")

        for name in ("interval_s", "timeout_s"):
            value = getattr(self, name)
            need(0 < value < math.inf, name, "must be > 0 and finite", value)
        url = self.metrics_url
        need(
            url is None or url.startswith(("http://", "https://")),
            "metrics_url",
            "must be an http(s) URL",
            url,
        )
        need(
            bool(self.exporters) and all(isinstance(e, Exporter) for e in self.exporters),
            "exporters",
            f"must name at least one of {sorted(e.value for e in Exporter)}",
            self.exporters,
        )
        stale_after_s = self.pressure.stale_after_s
        need(
            stale_after_s > self.interval_s, "stale_after_s", "must be > interval_s", stale_after_s
        )

    def url_for(self, backend_url: str) -> str:
        """Where to scrape the backend at `backend_url`."""
        return self.metrics_url or backend_url.rstrip("/") + "/metrics"


_PROBE_FIELDS: dict[str, type] = {
    "enabled": bool,
    "metrics_url": str,
    "interval_s": float,
    "timeout_s": float,
}
_PRESSURE_FIELDS = (
    "stale_after_s",
    "waiting_saturation",
    "kv_saturation",
    "memory_saturation",
    "preemption_saturation_per_s",
)


def probe_config_from_mapping(
    data: Mapping[str, Any], *, where: str = "pressure", base: ProbeConfig | None = None
) -> ProbeConfig:
    """Build a `ProbeConfig` from a TOML table, over `base` (defaults when None), so that a
    service can layer per-backend tables over a shared one. Raises ValueError naming the field."""
    base = base or ProbeConfig()
    probe: dict[str, Any] = {}
    pressure: dict[str, Any] = {}
    for key, value in data.items():
        if key in _PROBE_FIELDS:
            probe[key] = _typed(value, _PROBE_FIELDS[key], f"{where}.{key}")
        elif key in _PRESSURE_FIELDS:
            pressure[key] = _typed(value, float, f"{where}.{key}")
        elif key == "signals":
            pressure[key] = _names(value, Signal, f"{where}.{key}")
        elif key == "exporters":
            probe[key] = _names(value, Exporter, f"{where}.{key}")
        else:
            raise ValueError(f"{where}.{key}: unknown field")
    try:
        return dataclasses.replace(
            base, pressure=dataclasses.replace(base.pressure, **pressure), **probe
        )
    except ValueError as exc:
        raise ValueError(str(exc).replace("pressure.", f"{where}.", 1)) from exc


def _typed(value: object, kind: type, where: str) -> object:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _names(value: object, kind: type[E], where: str) -> frozenset[E]:
    choices = sorted(member.value for member in kind)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a list of names from {choices}")
    unknown = [v for v in value if v not in choices]
    if unknown:
        raise ValueError(f"{where}: unknown name {unknown[0]!r}, expected one of {choices}")
    return frozenset(kind(v) for v in value)
