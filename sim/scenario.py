"""Scenarios from TOML: read, validate, and build the engine's `Scenario` value.

The format, field by field, is documented by the shipped scenarios in `sim/scenarios/`
(`spike.toml` carries a comment on every field). Errors name the field and its line:

    spike.toml:31: tiers[2].weight: must be > 0, got -1
"""

from __future__ import annotations

import csv
import difflib
import math
import tomllib
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import TypeVar

from policies.ladder import ShedLadder
from scheduler.core import AIMDConfig, GateMode, GradientConfig, LatencySignal
from scheduler.models.gpu import GpuConfig
from sim.engine.model import (
    Arrivals,
    BackendPool,
    CapacityEvent,
    ControllerKind,
    ControllerSpec,
    Diurnal,
    Process,
    QuotaAlgorithm,
    QuotaSpec,
    QuotaUnit,
    Scenario,
    SizeDist,
    SizeKind,
    Spike,
    TierSpec,
    TraceRecord,
)
from sim.scenario_schema import Context, ScenarioError, Table
from sim.toml_lines import FieldLines

__all__ = ["ScenarioError", "bundled_scenarios", "load_scenario", "parse_scenario"]


def bundled_scenarios() -> dict[str, Path]:
    """The scenarios shipped in `sim/scenarios/`, by name."""
    folder = resources.files("sim") / "scenarios"
    return {
        Path(str(entry)).stem: Path(str(entry))
        for entry in folder.iterdir()
        if str(entry).endswith(".toml")
    }


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario file, or a shipped scenario by name (`spike`)."""
    file = Path(path)
    shipped = bundled_scenarios()
    if not file.exists() and file.suffix == "" and str(path) in shipped:
        file = shipped[str(path)]
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        message = f"cannot read: {exc}"
        if file.suffix == "" and not file.exists():  # a name, not a path: which names there are
            close = difflib.get_close_matches(str(path), shipped, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            message = (
                f"no such file, nor a shipped scenario of that name ({hint}shipped: "
                f"{', '.join(sorted(shipped))})"
            )
        raise ScenarioError("scenario", message, source=str(path), line=None) from exc
    return parse_scenario(text, source=str(file), base_dir=file.parent)


def parse_scenario(
    text: str, *, source: str = "<scenario>", base_dir: Path | None = None
) -> Scenario:
    """Build a `Scenario` from TOML text; `ScenarioError` names the first bad field."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _decode_error_line(str(exc))
        raise ScenarioError("toml", str(exc), source=source, line=line) from exc
    ctx = Context(source, FieldLines(text), base_dir or Path.cwd())
    return _scenario(Table(data, "", ctx))


def _decode_error_line(message: str) -> int | None:
    marker = "at line "
    if marker not in message:
        return None
    digits = message.split(marker, 1)[1].split(",", 1)[0].strip(" )")
    return int(digits) if digits.isdigit() else None


def _scenario(root: Table) -> Scenario:
    name = root.text("name", "scenario")
    duration_s = root.number("duration_s", gt=0)
    seed = root.integer("seed", 1)
    sample_s = root.number("sample_s", 1.0, gt=0)
    tier_tables = root.tables("tiers")
    if not tier_tables:
        root.error("tiers", "at least one [[tiers]] table is required")
    tiers = tuple(_tier(t) for t in tier_tables)
    names = [t.name for t in tiers]
    for i, tier_name in enumerate(names):
        if tier_name in names[:i]:
            root.ctx.error(f"tiers[{i}].name", f"duplicate tier name {tier_name!r}")
    backends_table = root.table("backends")
    if backends_table is None:
        root.error("backends", "a [backends] table is required")
    backends = _pool(backends_table, min_count=1)
    fallback_table = root.table("fallback")
    fallback = _pool(fallback_table, min_count=0) if fallback_table else None
    spikes = tuple(_spike(t, names) for t in root.tables("spikes"))
    diurnal_table = root.table("diurnal")
    diurnal = _diurnal(diurnal_table, names) if diurnal_table else None
    events = tuple(_capacity_event(t, backends.count) for t in root.tables("capacity_events"))
    controller_table = root.table("controller")
    controller = _controller(controller_table) if controller_table else ControllerSpec()
    replicas = root.integer("replicas", 1, ge=1)
    scrape_age_s = root.number("scrape_age_s", 0.0, ge=0, lt=controller.tick_s)
    model_quota_table = root.table("model_quota")
    model_quota = _quota(model_quota_table, shared=True) if model_quota_table else None
    root.done()
    return Scenario(
        name=name,
        duration_s=duration_s,
        tiers=tiers,
        backends=backends,
        controller=controller,
        seed=seed,
        sample_s=sample_s,
        spikes=spikes,
        diurnal=diurnal,
        capacity_events=events,
        fallback=fallback,
        replicas=replicas,
        scrape_age_s=scrape_age_s,
        model_quota=model_quota,
    )


def _tier(t: Table) -> TierSpec:
    name = t.text("name")
    if not name:
        t.error("name", "must not be empty")
    process = Process(t.text("process", "poisson", choices=tuple(p.value for p in Process)))
    if process is Process.TRACE:
        arrivals = Arrivals(Process.TRACE, 0.0, _trace(t))
    else:
        arrivals = Arrivals(Process.POISSON, t.number("rate_rps", ge=0))
    ladder_names = t.names("ladder", ("cache", "fallback"))
    serve_stale = t.flag("serve_stale", True)
    try:
        ladder = ShedLadder.from_names(ladder_names, serve_stale=serve_stale)
    except ValueError as exc:
        t.error("ladder", str(exc).removeprefix("ladder.steps"))
    quota_table = t.table("quota")
    tenant_quota_table = t.table("tenant_quota")
    spec = TierSpec(
        name=name,
        weight=t.number("weight", gt=0),
        max_wait_s=t.number("max_wait_s", gt=0),
        max_depth=t.integer("max_depth", 100_000, ge=1),
        slo_latency_s=t.number("slo_latency_s", gt=0),
        arrivals=arrivals,
        shed_on_overload=t.flag("shed_on_overload", False),
        fail_fast=t.flag("fail_fast", False),
        priority=t.integer("priority", 0),
        floor=t.number("floor", 0.0, ge=0, lt=1),
        protect_latency_s=t.number("protect_latency_s", 0.0, ge=0),
        keys=t.integer("keys", 100, ge=1),
        key_skew=t.number("key_skew", 1.0, ge=0),
        prompt_tokens=_sizes(t, "prompt_tokens", 200),
        output_tokens=_sizes(t, "output_tokens", 100),
        ladder=ladder,
        cache_hit_ratio=t.number("cache_hit_ratio", 0.0, ge=0, le=1),
        quota=_quota(quota_table) if quota_table else None,
        shed_budget=t.number("shed_budget", 0.01, ge=0, le=1),
        tenants=t.integer("tenants", 0, ge=0),
        tenant_quota=_quota(tenant_quota_table, shared=True) if tenant_quota_table else None,
    )
    t.done()
    return spec


def _sizes(t: Table, key: str, default: int) -> SizeDist:
    """A number (fixed size) or a table {dist, mean, sigma, min, max}."""
    if not t.has(key):
        t.raw(key, None)
        return SizeDist(SizeKind.FIXED, float(default))
    if not isinstance(t.data[key], dict):
        return SizeDist(SizeKind.FIXED, t.number(key, ge=0))
    s = t.table(key)
    assert s is not None
    kind = SizeKind(s.text("dist", "fixed", choices=tuple(k.value for k in SizeKind)))
    low = s.integer("min", 1 if key == "output_tokens" else 0, ge=0)
    high = s.integer("max", 1 << 20, ge=low)
    mean = s.number("mean", gt=0) if kind is not SizeKind.UNIFORM else (low + high) / 2
    sigma = s.number("sigma", 0.5, gt=0) if kind is SizeKind.LOGNORMAL else 0.0
    s.done()
    return SizeDist(kind, mean, sigma, low, high)


def _quota(q: Table, *, shared: bool = False) -> QuotaSpec:
    """A key's quota table, or (`shared`) a tenant's or the model's: those count by
    `sliding_counter` (default) or `gcra`, as the service's (a log per tenant or model would
    keep an entry per request of all its keys)."""
    kinds = tuple(a.value for a in QuotaAlgorithm if not shared or a.value != "sliding_log")
    algorithm = QuotaAlgorithm(
        q.text("algorithm", "sliding_counter" if shared else "sliding_log", choices=kinds)
    )
    limit = q.integer("limit", ge=1)
    spec = QuotaSpec(
        limit=limit,
        period_s=q.number("period_s", 1.0, gt=0),
        burst=q.integer("burst", limit, ge=1),
        algorithm=algorithm,
        unit=QuotaUnit(q.text("unit", "requests", choices=tuple(u.value for u in QuotaUnit))),
    )
    q.done()
    return spec


def _pool(t: Table, *, min_count: int) -> BackendPool:
    defaults = GpuConfig()
    gpu = GpuConfig(
        max_batch=t.integer("max_batch", defaults.max_batch, ge=1),
        kv_capacity_tokens=t.integer("kv_capacity_tokens", defaults.kv_capacity_tokens, ge=1),
        max_waiting=t.integer("max_waiting", defaults.max_waiting, ge=0),
        decode_base_s=t.number("decode_base_s", defaults.decode_base_s, ge=0),
        decode_per_seq_s=t.number("decode_per_seq_s", defaults.decode_per_seq_s, ge=0),
        prefill_tokens_per_step=t.number(
            "prefill_tokens_per_step", defaults.prefill_tokens_per_step, gt=0
        ),
        prefill_s_per_token=t.number("prefill_s_per_token", defaults.prefill_s_per_token, ge=0),
        decode_per_kv_token_s=t.number(
            "decode_per_kv_token_s", defaults.decode_per_kv_token_s, ge=0
        ),
        prefill_join_s=t.number("prefill_join_s", defaults.prefill_join_s, ge=0),
        decode_alone_s=t.number("decode_alone_s", defaults.decode_alone_s, ge=0),
    )
    pool = BackendPool(count=t.integer("count", ge=min_count), gpu=gpu)
    t.done()
    return pool


def _spike(t: Table, tiers: list[str]) -> Spike:
    spike = Spike(
        at_s=t.number("at_s", ge=0),
        duration_s=t.number("duration_s", gt=0),
        factor=t.number("factor", ge=0),
        tiers=_tier_names(t, tiers),
    )
    t.done()
    return spike


def _tier_names(t: Table, tiers: list[str]) -> tuple[str, ...]:
    names = t.names("tiers", ())
    for name in names:
        if name not in tiers:
            t.error("tiers", f"unknown tier {name!r} (tiers: {', '.join(tiers)})")
    return names


def _diurnal(t: Table, tiers: list[str]) -> Diurnal:
    period_s = t.number("period_s", 86_400.0, gt=0)
    raw = t.raw("points")
    points: list[tuple[float, float]] = []
    if not isinstance(raw, list) or not raw:
        t.error("points", "must be a non-empty list of [t_s, multiplier] pairs")
    for i, point in enumerate(raw):
        ok = isinstance(point, list) and len(point) == 2
        if not ok or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in point):
            t.error("points", f"[{i}] must be a [t_s, multiplier] pair of numbers, got {point!r}")
        at, mult = float(point[0]), float(point[1])
        if not 0 <= at < period_s or not mult >= 0 or not math.isfinite(mult):
            t.error("points", f"[{i}] needs 0 <= t_s < period_s and multiplier >= 0, got {point!r}")
        points.append((at, mult))
    if len({p[0] for p in points}) != len(points):
        t.error("points", "two points share a t_s")
    diurnal = Diurnal(tuple(points), period_s, _tier_names(t, tiers))
    t.done()
    return diurnal


def _capacity_event(t: Table, pool_size: int) -> CapacityEvent:
    at_s = t.number("at_s", ge=0)
    backends = t.integer("backends", 1, ge=1)
    if backends > pool_size:
        t.error("backends", f"must be at most the pool's count ({pool_size}), got {backends}")
    restore_at_s = t.number("restore_at_s", math.inf, gt=at_s, finite=False)
    t.done()
    return CapacityEvent(at_s, backends, restore_at_s)


_AIMD_FLOATS = (
    "initial_limit",
    "min_limit",
    "max_limit",
    "increase_step",
    "slow_start_growth",
    "decrease_factor",
    "target_latency_s",
    "latency_percentile",
    "pressure_threshold",
    "cooldown_s",
    "min_utilization",
    "tick_s",
)
_GRADIENT_FLOATS = (
    "initial_limit",
    "min_limit",
    "max_limit",
    "tolerance",
    "smoothing",
    "pressure_threshold",
    "min_utilization",
    "tick_s",
)
_SIGNALS = tuple(s.value for s in LatencySignal)


def _controller(t: Table) -> ControllerSpec:
    kind = ControllerKind(t.text("kind", "aimd", choices=tuple(k.value for k in ControllerKind)))
    mode = GateMode(t.text("mode", "window", choices=tuple(m.value for m in GateMode)))
    aimd = _aimd(t, AIMDConfig())
    rate_table = t.table("rate")
    rate_aimd = _aimd(rate_table, aimd) if rate_table else None
    if rate_table:
        rate_table.done()
    gradient_table = t.table("gradient")
    gradient = _gradient(gradient_table) if gradient_table else GradientConfig()
    spec = ControllerSpec(
        kind=kind,
        mode=mode,
        burst_s=t.number("burst_s", 0.05, gt=0),
        aimd=aimd,
        gradient=gradient,
        fixed_limit=t.number("fixed_limit", 64.0, gt=0),
        rate_aimd=rate_aimd,
    )
    t.done()
    return spec


def _aimd(t: Table, base: AIMDConfig) -> AIMDConfig:
    values: dict[str, object] = {
        name: t.number(name, getattr(base, name)) for name in _AIMD_FLOATS if t.has(name)
    }
    if t.has("latency_signal"):
        values["latency_signal"] = LatencySignal(t.text("latency_signal", choices=_SIGNALS))
    return _build(t, base, values, "controller.")


def _gradient(t: Table) -> GradientConfig:
    base = GradientConfig()
    values: dict[str, object] = {
        name: t.number(name, getattr(base, name)) for name in _GRADIENT_FLOATS if t.has(name)
    }
    if t.has("long_window_ticks"):
        values["long_window_ticks"] = t.integer("long_window_ticks", ge=1)
    if t.has("latency_signal"):
        values["latency_signal"] = LatencySignal(t.text("latency_signal", choices=_SIGNALS))
    config = _build(t, base, values, "controller.")
    t.done()
    return config


C = TypeVar("C", AIMDConfig, GradientConfig)


def _build(t: Table, base: C, values: dict[str, object], prefix: str) -> C:
    """Construct a core config; its own checks' messages name `prefix + field`."""
    try:
        return replace(base, **values)  # type: ignore[arg-type]
    except ValueError as exc:
        message = str(exc)
        field = message.removeprefix(prefix).split(" ", 1)[0].rstrip(":")
        key = field if field in values else next(iter(values), "")
        rest = message.split(" ", 1)[1] if " " in message else message
        t.error(key, rest)
    except TypeError as exc:  # pragma: no cover - the getters check types first
        t.error("", str(exc))


def _trace(t: Table) -> tuple[TraceRecord, ...]:
    """A CSV with a header: `at_s` (required), then optional `key`, `prompt_tokens`,
    `output_tokens`; the path is relative to the scenario file."""
    name = t.text("trace")
    path = t.ctx.base_dir / name
    records: list[TraceRecord] = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "at_s" not in reader.fieldnames:
                t.error("trace", f"{name}: the CSV needs a header with an at_s column")
            for row in reader:
                records.append(_trace_record(t, name, reader.line_num, row))
    except OSError as exc:
        t.error("trace", f"cannot read {name}: {exc}")
    records.sort(key=lambda r: r.at_s)
    return tuple(records)


def _trace_record(t: Table, name: str, line: int, row: dict[str, str]) -> TraceRecord:
    def number(column: str) -> int | None:
        value = (row.get(column) or "").strip()
        if not value:
            return None
        if not value.isdigit():
            t.error("trace", f"{name}:{line}: {column} must be a whole number, got {value!r}")
        return int(value)

    try:
        at_s = float(row["at_s"])
    except (TypeError, ValueError):
        t.error("trace", f"{name}:{line}: at_s must be a number, got {row.get('at_s')!r}")
    if not at_s >= 0 or not math.isfinite(at_s):
        t.error("trace", f"{name}:{line}: at_s must be >= 0, got {at_s}")
    key = (row.get("key") or "").strip() or None
    return TraceRecord(at_s, key, number("prompt_tokens"), number("output_tokens"))
