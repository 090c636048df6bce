"""The service's configuration: one TOML file, validated once at the edge.

Every error names the field by its dotted path (`tiers.free.weight`), so an operator can find
it. Secrets never live in the file: a key can be given as `key_env = "VAR"`, and the HMAC
secret that turns keys into ids comes from `SCHEDULER_KEY_SECRET`. With no file at all the
defaults run the demo: three tiers, three demo keys, the built-in demo backend.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import hmac
import math
import os
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from backends.http.client import BackendLimits
from backends.redis.quota import ALGORITHM_KINDS
from backends.redis.topology import RedisSecrets, parse_redis_url
from policies.ladder import ShedLadder
from scheduler.core import AIMDConfig, GateConfig, GateMode, LatencySignal, TierConfig
from scheduler.errors import SchedulerError
from scheduler.models.gpu import GpuConfig
from scheduler.models.pressure_config import ProbeConfig, probe_config_from_mapping
from scheduler.service.quota import FailMode, QuotaSettings
from scheduler.service.quota_layers import SharedQuotas

DEMO_BACKEND = "demo"  # a model's backend list may name the built-in demo server
DEFAULT_REDIS_TIMEOUT_S = 0.1  # each Redis call on the request path; then the fail mode
MAX_COUNT = 2**53 - 1  # quota counts and credits: exact as doubles, in Lua and in Python
MAX_PERIOD_S = 366 * 86_400.0  # the longest quota period
MAX_TTL_S = 90 * 86_400.0  # upgrades and credits last at most 90 days
DEMO_KEYS = {"sk-demo-free": "free", "sk-demo-pro": "pro", "sk-demo-enterprise": "enterprise"}


class ConfigError(SchedulerError, ValueError):
    """The configuration is invalid; the message names the field."""


@dataclass(frozen=True, slots=True)
class TierSettings:
    core: TierConfig
    ladder: ShedLadder
    slo_s: float
    quotas: QuotaSettings = field(default_factory=QuotaSettings)
    fail_mode: FailMode = FailMode.OPEN


@dataclass(frozen=True, slots=True)
class KeySettings:
    key_id: str
    tenant: str
    tier: str
    bypass: bool = False


@dataclass(frozen=True, slots=True)
class ModelSettings:
    name: str
    backends: tuple[str, ...]
    fallback: str | None = None
    shared_cache: bool = False
    cache_fresh_s: float = 300.0  # 0 = do not cache this model's responses
    cache_stale_s: float = 3600.0
    max_inflight: int = 256  # headroom limit when serving as a fallback
    pressure: ProbeConfig = field(default_factory=ProbeConfig)  # each backend's /metrics probe
    api_key: str = field(default="", repr=False)  # sent to the backends (from `api_key_env`)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    replicas: int = 0  # processes sharing the quotas, for fail-open shares; 0 = workers
    max_body_bytes: int = 4 * 1024 * 1024
    default_max_tokens: int = 256
    request_timeout_s: float = 300.0
    # a stream's first body byte comes within this (then `request_timeout_s` bounds the rest)
    first_byte_timeout_s: float = 60.0
    drain_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings
    tiers: tuple[TierSettings, ...]
    keys: tuple[KeySettings, ...]
    models: tuple[ModelSettings, ...]
    controller: AIMDConfig
    gate: GateConfig
    backend_limits: BackendLimits
    demo: GpuConfig
    shared_quotas: SharedQuotas = field(default_factory=SharedQuotas)  # tenants' and models'
    redis_url: str | None = None
    redis_timeout_s: float = 0.1
    redis_prefix: str = "sched"  # every Redis key of this deployment starts with it
    redis_secrets: RedisSecrets = field(default=RedisSecrets(), repr=False)  # from the env
    key_secret: bytes = field(default=b"", repr=False)
    admin_token: str = field(default="", repr=False)
    source: str | None = None  # the file these settings came from (SIGHUP reloads its gains)

    def tier(self, name: str) -> TierSettings:
        return next(t for t in self.tiers if t.core.name == name)

    def model(self, name: str) -> ModelSettings | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def replicas(self) -> int:
        return self.server.replicas or self.server.workers

    @property
    def uses_demo_backend(self) -> bool:
        return any(DEMO_BACKEND in m.backends for m in self.models)


def key_id(key: str, secret: bytes) -> str:
    """The id a key is known by everywhere: an HMAC, so the clear key is never kept."""
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:32]


T = TypeVar("T")


class Table:
    """A TOML table with its dotted path, for errors that name the field."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        self.data = data
        self.path = path
        self.used: set[str] = set()

    def where(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: type[T], default: T) -> T:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if kind is int and isinstance(value, float) and value.is_integer():
            value, ok = int(value), True  # JSON Schema's integer: 5.0 is 5
        if kind is float and ok and not math.isfinite(value):
            raise ConfigError(f"{self.where(name)}: expected a finite number, got {value}")
        if not ok:
            raise ConfigError(
                f"{self.where(name)}: expected {kind.__name__}, got {type(value).__name__}"
            )
        return value  # type: ignore[no-any-return]

    def table(self, name: str) -> Table:
        return Table(self.get(name, dict, {}), self.where(name))

    def done(self) -> None:
        self.only(self.used)

    def only(self, known: Collection[str]) -> None:
        """Refuse a field not in `known`, before any other check of the table: a typo
        (`backend =`) is named as such, not as the field it failed to set being missing."""
        unknown = sorted(set(self.data) - set(known))
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{self.where(unknown[0])}: unknown field{hint}")


def _check(ok: bool, where: str, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {rule}")


def _build(make: Callable[[], T], where: str) -> T:
    """Build a core config object, re-raising its ValueError under the file's path."""
    try:
        return make()
    except ValueError as exc:
        message = str(exc)
        for prefix in ("controller.", "gate.", "backend.", "tiers."):
            if message.startswith(prefix):
                message = message.split(".", 1)[1]
        raise ConfigError(f"{where}.{message}") from exc


# The tiers when the file names none (and the zero-config demo): each with per-key quotas, so
# the first thing this gateway is for, "N requests per minute per key", shows at once.
DEFAULT_TIERS = {
    "enterprise": {
        "weight": 8,
        "max_wait_s": 30.0,
        "max_depth": 2000,
        "slo_s": 30.0,
        "quota": {"requests": 1000, "tokens": 1_000_000},
    },
    "pro": {
        "weight": 3,
        "max_wait_s": 15.0,
        "max_depth": 1000,
        "slo_s": 20.0,
        "fail_fast": True,
        "quota": {"requests": 100, "tokens": 100_000},
    },
    "free": {
        "weight": 1,
        "max_wait_s": 5.0,
        "max_depth": 500,
        "slo_s": 10.0,
        "shed_on_overload": True,
        "fail_fast": True,
        "quota": {"requests": 10, "tokens": 10_000},
    },
}


def _tiers(root: Table) -> tuple[TierSettings, ...]:
    raw = root.get("tiers", dict, DEFAULT_TIERS)
    _check(bool(raw), "tiers", "at least one tier is required")
    tiers = []
    for name, body in raw.items():
        _check(isinstance(body, dict), f"tiers.{name}", "expected a table")
        t = Table(body, f"tiers.{name}")
        weight = t.get("weight", float, 1.0)
        max_wait_s = t.get("max_wait_s", float, 10.0)
        core = _build(
            partial(
                TierConfig,
                name,
                weight,
                max_wait_s=max_wait_s,
                max_depth=t.get("max_depth", int, 1000),
                shed_on_overload=t.get("shed_on_overload", bool, False),
                fail_fast=t.get("fail_fast", bool, False),
                priority=t.get("priority", int, 0),
                floor=t.get("floor", float, 0.0),
                protect_latency_s=t.get("protect_latency_s", float, 0.0),
            ),
            "tiers",
        )
        ladder_names = t.get("ladder", list, ["cache", "fallback"])
        serve_stale = t.get("serve_stale", bool, True)
        try:
            ladder = ShedLadder.from_names(ladder_names, serve_stale=serve_stale)
        except ValueError as exc:
            raise ConfigError(f"tiers.{name}.ladder: {exc}") from exc
        slo_s = t.get("slo_s", float, max_wait_s * 2)
        _check(slo_s > 0, f"tiers.{name}.slo_s", "must be > 0")
        fail_mode = t.get("fail_mode", str, "open")
        _check(fail_mode in ("open", "closed"), t.where("fail_mode"), "expected 'open' or 'closed'")
        quotas = quota_settings(t.table("quota"))
        t.done()
        tiers.append(TierSettings(core, ladder, slo_s, quotas, FailMode(fail_mode)))
    return tuple(tiers)


_LAYER_FIELDS = ("algorithm", "period_s", "requests", "tokens", "request_burst", "token_burst")


def layer_quota(table: Table) -> QuotaSettings:
    """A shared layer's quota table (`[tenants.T.quota]`, `[models.M.quota]`): the fields of
    a tier's but the per-key ones (`max_concurrency`, `congested_factor`), counting requests
    or tokens, by `sliding_counter` (the default) or `gcra`: every request of the tenant or
    model is counted on it, and a `sliding_log` would keep (and read, on every request) an
    entry per request in the window."""
    table.only((*_LAYER_FIELDS, "enforce"))
    counts = any(table.data.get(name) for name in ("requests", "tokens"))
    _check(counts, table.path, "a shared quota needs requests or tokens")
    quotas = quota_settings(table, QuotaSettings(algorithm="sliding_counter"))
    _check(
        quotas.algorithm != "sliding_log",
        table.where("algorithm"),
        "a shared quota is counted by sliding_counter or gcra (a sliding_log would keep an "
        "entry per request of the whole tenant or model)",
    )
    return quotas


def _shared_quotas(root: Table, models: Table) -> SharedQuotas:
    """`[tenants.T.quota]` (`T = "*"`: every tenant without its own) and `[models.M.quota]`."""
    tenants = []
    for name, body in root.get("tenants", dict, {}).items():
        _check(isinstance(body, dict), f"tenants.{name}", "expected a table")
        t = Table(body, f"tenants.{name}")
        t.only(("quota",))
        tenants.append((name, layer_quota(t.table("quota"))))
    per_model = []
    for name, body in models.data.items():
        if isinstance(body, dict) and "quota" in body:
            per_model.append((name, layer_quota(Table(body["quota"], f"models.{name}.quota"))))
    return SharedQuotas(tuple(tenants), tuple(per_model))


def quota_settings(table: Table, base: QuotaSettings | None = None) -> QuotaSettings:
    """A quota table (`[tiers.X.quota]`, or an admin API body) over `base`'s values."""
    base = base or QuotaSettings()
    algorithm = table.get("algorithm", str, base.algorithm)
    _check(
        algorithm in ALGORITHM_KINDS,
        table.where("algorithm"),
        f"expected one of {', '.join(ALGORITHM_KINDS)}",
    )
    values = {
        "period_s": table.get("period_s", float, base.period_s),
        "requests": table.get("requests", int, base.requests),
        "tokens": table.get("tokens", int, base.tokens),
        "request_burst": table.get("request_burst", int, base.request_burst),
        "token_burst": table.get("token_burst", int, base.token_burst),
        "max_concurrency": table.get("max_concurrency", int, base.max_concurrency),
    }
    enforce = table.get("enforce", bool, base.enforce)
    congested_factor = table.get("congested_factor", float, base.congested_factor)
    table.done()
    _check(0 < congested_factor <= 1, table.where("congested_factor"), "must be in (0, 1]")
    period_s = values["period_s"]
    _check(0 < period_s <= MAX_PERIOD_S, table.where("period_s"), "must be in (0, 1 year]")
    for name in ("requests", "tokens", "request_burst", "token_burst", "max_concurrency"):
        _check(
            0 <= values[name] <= MAX_COUNT,
            table.where(name),
            f"must be in [0, {MAX_COUNT}] (0 = no such quota)",
        )
    _check(
        enforce or any(values[name] > 0 for name in ("requests", "tokens", "max_concurrency")),
        table.where("enforce"),
        "a shadow quota (enforce = false) needs requests, tokens or max_concurrency to count",
    )
    return QuotaSettings(
        algorithm,  # type: ignore[arg-type]
        **values,  # type: ignore[arg-type]
        enforce=enforce,
        congested_factor=congested_factor,
    )


def _keys(
    root: Table, tiers: set[str], secret: bytes, env: Mapping[str, str], *, demo: bool
) -> tuple[KeySettings, ...]:
    """The `[[keys]]` of the file; the public demo keys only with no file at all (a file
    without keys has none: the admin API may create them)."""
    default = [{"key": k, "tenant": f"demo-{t}", "tier": t} for k, t in DEMO_KEYS.items()]
    raw = root.get("keys", list, default if demo else [])
    keys = []
    for i, body in enumerate(raw):
        where = f"keys[{i}]"
        _check(isinstance(body, dict), where, "expected a table")
        t = Table(body, where)
        clear = t.get("key", str, "")
        env_name = t.get("key_env", str, "")
        if env_name:
            _check(not clear, where, "give key or key_env, not both")
            clear = env.get(env_name, "")
            _check(bool(clear), t.where("key_env"), f"environment variable {env_name} is not set")
        _check(bool(clear), t.where("key"), "a key (or key_env) is required")
        tier = t.get("tier", str, "")
        _check(tier in tiers, t.where("tier"), f"unknown tier {tier!r}")
        tenant = t.get("tenant", str, "")
        _check(bool(tenant), t.where("tenant"), "a tenant is required")
        keys.append(KeySettings(key_id(clear, secret), tenant, tier, t.get("bypass", bool, False)))
        t.done()
    return tuple(keys)


_MODEL_FIELDS = (
    "backends",
    "fallback",
    "shared_cache",
    "cache_fresh_s",
    "cache_stale_s",
    "max_inflight",
    "pressure",
    "quota",
    "api_key_env",
)


def _models(root: Table, env: Mapping[str, str]) -> tuple[ModelSettings, ...]:
    raw = root.get("models", dict, {"demo-small": {"backends": [DEMO_BACKEND]}})
    _check(bool(raw), "models", "at least one model is required")
    models = []
    for name, body in raw.items():
        _check(isinstance(body, dict), f"models.{name}", "expected a table")
        t = Table(body, f"models.{name}")
        t.only(_MODEL_FIELDS)
        backends = t.get("backends", list, [])
        t.get("quota", dict, {})  # the model's shared quota: `_shared_quotas`
        _check(bool(backends), t.where("backends"), "at least one backend URL is required")
        for url in backends:
            _check(
                isinstance(url, str)
                and (url == DEMO_BACKEND or url.startswith(("http://", "https://"))),
                t.where("backends"),
                f"expected http(s) URLs or {DEMO_BACKEND!r}, got {url!r}",
            )
            _check(
                not url.rstrip("/").endswith("/v1"),
                t.where("backends"),
                f"give each server's base URL without /v1 (the gateway adds /v1/...), got {url!r}",
            )
        fallback = t.get("fallback", str, "") or None
        _check(
            fallback is None or fallback in raw, t.where("fallback"), f"unknown model {fallback!r}"
        )
        _check(fallback != name, t.where("fallback"), "a model cannot fall back to itself")
        model = ModelSettings(
            name,
            tuple(backends),
            fallback,
            t.get("shared_cache", bool, False),
            t.get("cache_fresh_s", float, 300.0),
            t.get("cache_stale_s", float, 3600.0),
            t.get("max_inflight", int, 256),
            _probe(t.get("pressure", dict, {}), t.where("pressure")),
            _backend_key(t, env),
        )
        _check(model.cache_fresh_s >= 0, t.where("cache_fresh_s"), "must be >= 0")
        _check(model.cache_stale_s >= 0, t.where("cache_stale_s"), "must be >= 0")
        _check(model.max_inflight >= 1, t.where("max_inflight"), "must be >= 1")
        models.append(model)
        t.done()
    return tuple(models)


def _backend_key(t: Table, env: Mapping[str, str]) -> str:
    """The key the model's backends want (vLLM's or llama-server's `--api-key`), from the
    environment variable `api_key_env` names: never in the file."""
    env_name = t.get("api_key_env", str, "")
    key = env.get(env_name, "") if env_name else ""
    _check(
        not env_name or bool(key),
        t.where("api_key_env"),
        f"environment variable {env_name} is not set",
    )
    return key


def _check_redis_url(url: str, where: str) -> None:
    """A Redis URL of one of the three topologies (`backends.redis.topology`): one server
    (`redis://`, `rediss://`, `unix://`), a Redis Cluster (`redis+cluster://h1:p1,h2:p2/`) or
    Sentinel (`redis+sentinel://s1:p1,s2:p2/service_name[/db]`)."""
    if not url:
        return
    try:
        parse_redis_url(url)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _probe(data: dict[str, Any], where: str) -> ProbeConfig:
    try:
        return probe_config_from_mapping(data, where=where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _dataclass_from(table: Table, cls: type[T], where: str, **fixed: Any) -> T:
    """Fill a frozen config dataclass from a table, field by field, with type checks."""
    values: dict[str, Any] = dict(fixed)
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in table.data and f.name not in fixed:
            default = f.default
            kind: type = type(default) if default is not None else str
            values[f.name] = table.get(f.name, kind, default)
    table.done()
    return _build(partial(cls, **values), where)


def _controller(root: Table) -> tuple[AIMDConfig, GateConfig]:
    t = root.table("controller")
    mode_name = t.get("mode", str, "window")
    _check(mode_name in {m.value for m in GateMode}, t.where("mode"), "expected 'rate' or 'window'")
    burst_s = t.get("burst_s", float, GateConfig().burst_s)
    signal_name = t.get("latency_signal", str, "latency")
    _check(
        signal_name in {s.value for s in LatencySignal},
        t.where("latency_signal"),
        "expected 'latency', 'ttft' or 'tpot'",
    )
    gate = _build(partial(GateConfig, GateMode(mode_name), burst_s), "controller")
    aimd = _dataclass_from(t, AIMDConfig, "controller", latency_signal=LatencySignal(signal_name))
    return aimd, gate


def gains_to_dict(config: AIMDConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data["latency_signal"] = config.latency_signal.value
    return data


def gains_from_dict(data: Mapping[str, Any]) -> AIMDConfig:
    """The inverse of `gains_to_dict`; raises ValueError naming a bad gain."""
    values = dict(data)
    values["latency_signal"] = LatencySignal(values.get("latency_signal", "latency"))
    return AIMDConfig(**values)


def _read_toml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _server(root: Table, overrides: Mapping[str, Any] | None) -> ServerSettings:
    """`[server]`, with the command line's fields over the file's."""
    table = root.table("server")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    table.data = {**table.data, **given}
    server = _dataclass_from(table, ServerSettings, "server")
    _check(0 <= server.port < 65536, "server.port", "must be a TCP port")
    _check(server.workers >= 1, "server.workers", "must be >= 1")
    _check(server.replicas >= 0, "server.replicas", "must be >= 0")
    _check(server.max_body_bytes >= 1024, "server.max_body_bytes", "must be >= 1024")
    _check(server.default_max_tokens >= 1, "server.default_max_tokens", "must be >= 1")
    return server


def _check_timeouts(server: ServerSettings) -> None:
    for name in ("request_timeout_s", "first_byte_timeout_s"):
        value = getattr(server, name)
        _check(math.isfinite(value) and value > 0, f"server.{name}", "must be > 0")


@dataclass(frozen=True, slots=True)
class _RedisSettings:
    url: str
    timeout_s: float
    prefix: str


def _redis(root: Table, env: Mapping[str, str]) -> _RedisSettings:
    """`[redis]`; `SCHEDULER_REDIS_URL` (`--redis-url`) over the file's URL."""
    table = root.table("redis")
    url = table.get("url", str, "")
    _check_redis_url(url, "redis.url")
    if env.get("SCHEDULER_REDIS_URL"):
        url = env["SCHEDULER_REDIS_URL"]
        _check_redis_url(url, "SCHEDULER_REDIS_URL (--redis-url)")
    timeout_s = table.get("timeout_s", float, DEFAULT_REDIS_TIMEOUT_S)
    prefix = table.get("prefix", str, "sched")
    _check(
        bool(prefix) and not set("{}") & set(prefix) and len(prefix) <= 64,
        "redis.prefix",
        "must be 1 to 64 characters without braces",
    )
    _check(0.001 <= timeout_s <= 5, "redis.timeout_s", "must be in [0.001, 5]")
    table.done()
    return _RedisSettings(url, timeout_s, prefix)


def load_settings(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read and validate the config (defaults when `path` is None). `overrides` are
    [server] fields from the command line."""
    env = os.environ if env is None else env
    root = Table(_read_toml(path), "")
    server = _server(root, overrides)
    tiers = _tiers(root)
    secret = env.get("SCHEDULER_KEY_SECRET", "").encode() or b"scheduler-dev-secret"
    keys = _keys(root, {t.core.name for t in tiers}, secret, env, demo=path is None)
    models = _models(root, env)
    shared = _shared_quotas(root, Table(root.get("models", dict, {}), "models"))
    controller, gate = _controller(root)
    redis = _redis(root, env)
    limits = _dataclass_from(root.table("backend_limits"), BackendLimits, "backend_limits")
    demo = _dataclass_from(root.table("demo_backend"), GpuConfig, "demo_backend")
    root.done()
    _check_timeouts(server)
    return Settings(
        server=server,
        tiers=tiers,
        keys=keys,
        models=models,
        shared_quotas=shared,
        controller=controller,
        gate=gate,
        backend_limits=limits,
        demo=demo,
        redis_url=redis.url or None,
        redis_timeout_s=redis.timeout_s,
        redis_prefix=redis.prefix,
        redis_secrets=RedisSecrets.from_env(env),
        key_secret=secret,
        admin_token=env.get("SCHEDULER_ADMIN_TOKEN", ""),
        source=None if path is None else str(path),
    )


def startup_lines(settings: Settings) -> list[str]:
    """What `scheduler serve` says about its tenancy at start-up: each tier's quotas, and a
    word when no key can get in (keys may still come through the admin API)."""
    lines = []
    for tier in settings.tiers:
        q = tier.quotas
        parts = [f"{q.requests} requests"] if q.requests else []
        parts += [f"{q.tokens} tokens"] if q.tokens else []
        shadow = ", shadow: counted, never refused" if not q.enforce else ""
        quota = f"{' and '.join(parts)} per {q.period_s:g} s per key ({q.algorithm}{shadow})"
        lines.append(f"tier {tier.core.name}: {quota if parts else 'no quota'}")
    shared = settings.shared_quotas
    for kind, whose, tables in (
        ("tenant", "for all its keys", shared.tenants),
        ("model", "for every request to it", shared.models),
    ):
        for name, q in tables:
            parts = [f"{q.requests} requests"] if q.requests else []
            parts += [f"{q.tokens} tokens"] if q.tokens else []
            shadow = ", shadow: counted, never refused" if not q.enforce else ""
            counted = f"{' and '.join(parts)} per {q.period_s:g} s {whose}"
            lines.append(f"{kind} {name}: {counted} ({q.algorithm}{shadow})")
    if not settings.keys:
        admin = (
            "create them through the admin API"
            if settings.admin_token
            else "set SCHEDULER_ADMIN_TOKEN to create them through the admin API"
        )
        lines.append(f"no API keys configured: every inference request gets 401; {admin}")
    return lines
