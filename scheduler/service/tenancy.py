"""Tenants and keys: the config file's keys, and keys managed live in Redis.

Why a short local cache: every request needs its key's record, and every replica must see a
revocation or a quota change within a second without a restart. Each replica keeps a record
for `cache_s` (0.5 s) and then asks Redis again; while Redis is out it keeps using the last
record it saw (and the config file's keys), so an outage does not lock tenants out.

The records live in Redis through `backends.redis.keys.RedisKeyStore` (its key layout there).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from backends.redis.errors import RedisUnavailable
from backends.redis.keys import RedisKeyStore
from policies.breaker import CircuitBreaker, ScopedBreakers
from scheduler.errors import SchedulerError
from scheduler.service.config import KeySettings, key_id
from scheduler.service.quota import AdaptiveTimeout, QuotaSettings

QUOTA_FIELDS = (
    "requests",
    "tokens",
    "period_s",
    "algorithm",
    "request_burst",
    "token_burst",
    "max_concurrency",
)


class KeysUnavailable(SchedulerError):
    """A key neither known here nor checkable in Redis right now: retry, not 401."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    tenant: str
    tier: str
    bypass: bool = False
    revoked: bool = False
    override: tuple[tuple[str, Any], ...] = ()
    upgrade: tuple[tuple[str, Any], ...] = ()

    def quotas(self, tier_default: QuotaSettings) -> QuotaSettings:
        """The tier's quotas, then the key's override, then a live temporary upgrade."""
        if not self.override and not self.upgrade:
            return tier_default
        return dataclasses.replace(tier_default, **{**dict(self.override), **dict(self.upgrade)})

    def public(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "tenant": self.tenant,
            "tier": self.tier,
            "bypass": self.bypass,
            "revoked": self.revoked,
            "quota_override": dict(self.override),
            "upgrade": dict(self.upgrade),
        }


_Packed = tuple[str, str, str, bool, bool, tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]]


def _pack(r: KeyRecord | None) -> _Packed | None:
    if r is None:
        return None
    return (r.key_id, r.tenant, r.tier, r.bypass, r.revoked, r.override, r.upgrade)


def _unpack(packed: _Packed | None) -> KeyRecord | None:
    return None if packed is None else KeyRecord(*packed)


def _quota_fields(data: dict[str, str], prefix: str = "") -> tuple[tuple[str, Any], ...]:
    fields: list[tuple[str, Any]] = []
    for name in QUOTA_FIELDS:
        value = data.get(prefix + name)
        if value is None or value == "":
            continue
        if name == "algorithm":
            fields.append((name, value))
        elif name == "period_s":
            fields.append((name, float(value)))
        else:
            fields.append((name, int(value)))
    return tuple(fields)


class KeyRegistry:
    """Finds the record of a key id; creates, lists and changes keys for the admin API."""

    def __init__(
        self,
        static: tuple[KeySettings, ...],
        secret: bytes,
        *,
        cache_s: float = 0.5,
        timeout: AdaptiveTimeout | None = None,
        breakers: ScopedBreakers | None = None,
        scope_of: Callable[[str], str] = lambda key_id: "",
    ) -> None:
        self._static = {k.key_id: KeyRecord(k.key_id, k.tenant, k.tier, k.bypass) for k in static}
        self._secret = secret
        self._cache_s = cache_s
        self._timeout = timeout or AdaptiveTimeout(0.1)
        # plain tuples of plain values, which the garbage collector stops tracking: 100,000
        # records as objects made each full collection take about 70 ms, longer than the
        # Redis timeout of every call in flight; as tuples, about 3 ms
        self._cache: dict[str, tuple[_Packed | None, float]] = {}
        # shared with the quota path: one view of each shard's health
        self._breakers = breakers
        self.scope_of = scope_of
        self._fetching: dict[str, trio.Event] = {}
        self.store: RedisKeyStore | None = None  # Redis, when connected

    def key_id(self, clear_key: str) -> str:
        return key_id(clear_key, self._secret)

    async def lookup(self, kid: str, *, now: float) -> KeyRecord | None:
        """The live record of `kid` (None: unknown). Revoked records are returned as such.

        Concurrent lookups of one key share one fetch: a burst on a key whose record just
        expired asks Redis once, not once per request, and while that fetch is out the others
        go on with the record Redis gave last (no request waits on another's fetch)."""
        cached = self._cache.get(kid)
        if cached is not None and now - cached[1] < self._cache_s:
            return _unpack(cached[0])
        stale = _unpack(cached[0]) if cached is not None else self._static.get(kid)
        fetching = self._fetching.get(kid)
        if fetching is not None:
            if cached is not None:  # Redis's last word, a fetch's time older than allowed
                return stale
            await fetching.wait()
            cached = self._cache.get(kid)
            if cached is None and stale is None:
                raise KeysUnavailable("the key could not be looked up in time")
            return stale if cached is None else _unpack(cached[0])
        breaker = self._breaker(kid)
        if self.store is None:
            return stale
        if breaker is not None and not breaker.allow(now=now):
            if stale is None:
                raise KeysUnavailable("Redis is unavailable and the key is not known here")
            return stale
        self._fetching[kid] = done = trio.Event()
        try:
            return await self._fetch(self.store, kid, stale, now)
        finally:
            del self._fetching[kid]
            done.set()

    async def refresh(self, kid: str, *, now: float) -> KeyRecord | None:
        """The record as Redis has it now, not as cached (for the admin API); raises
        KeysUnavailable when Redis cannot say."""
        if self.store is None:
            raise KeysUnavailable("Redis is not connected")
        self._cache.pop(kid, None)
        return await self._fetch(self.store, kid, None, now)

    def _breaker(self, kid: str) -> CircuitBreaker | None:
        return None if self._breakers is None else self._breakers.get(self.scope_of(kid))

    async def _fetch(
        self, store: RedisKeyStore, kid: str, stale: KeyRecord | None, now: float
    ) -> KeyRecord | None:
        breaker = self._breaker(kid)
        try:
            started = trio.current_time()
            # timed by the pipeliner on Redis's time, not our loop's lag (redis_pipeliner)
            meta, upgrade = await store.read(kid, timeout_s=self._timeout.current())
            self._timeout.observe(trio.current_time() - started)
        except RedisUnavailable as exc:
            if breaker is not None:
                breaker.record_failure(now=now)
            if stale is None:  # unknown here and unchecked: not the caller's fault (not 401)
                raise KeysUnavailable("the key could not be looked up in time") from exc
            return stale
        if breaker is not None:
            breaker.record_success(now=now)
        record = self._record(kid, meta, upgrade)
        if len(self._cache) > 100_000:
            self._cache = {k: v for k, v in self._cache.items() if now - v[1] < self._cache_s}
        self._cache[kid] = (_pack(record), now)
        return record

    def _record(self, kid: str, meta: dict[str, str], upgrade: dict[str, str]) -> KeyRecord | None:
        base = self._static.get(kid)
        if not meta:
            return base
        return KeyRecord(
            key_id=kid,
            tenant=meta.get("tenant") or (base.tenant if base else "?"),
            tier=meta.get("tier") or (base.tier if base else "?"),
            bypass=meta["bypass"] == "1" if "bypass" in meta else bool(base and base.bypass),
            revoked=meta.get("revoked") == "1",
            override=_quota_fields(meta, "q_"),
            upgrade=_quota_fields(upgrade),
        )

    # -- the admin API's operations (Redis required; its failures raised as RedisUnavailable)

    def _need_store(self) -> RedisKeyStore:
        if self.store is None:
            raise RuntimeError("Redis is not connected")
        return self.store

    def _base(self, kid: str) -> tuple[str, str] | None:
        """A config key's tenant and tier: its meta hash gets them when the admin API first
        changes it."""
        base = self._static.get(kid)
        return None if base is None else (base.tenant, base.tier)

    async def create(
        self, tenant: str, tier: str, *, bypass: bool, created_unix: float
    ) -> tuple[str, KeyRecord]:
        """A new key; the clear key is returned once and never stored."""
        store = self._need_store()
        clear = "sk-" + secrets.token_urlsafe(32)
        kid = self.key_id(clear)
        await store.create(
            kid,
            {
                "tenant": tenant,
                "tier": tier,
                "bypass": "1" if bypass else "0",
                "revoked": "0",
                "created": str(created_unix),
            },
        )
        self._cache.pop(kid, None)
        return clear, KeyRecord(kid, tenant, tier, bypass)

    async def list(self) -> list[KeyRecord]:
        store = self._need_store()
        kids = sorted(await store.ids() | set(self._static))
        records = [
            self._record(kid, meta, upgrade)
            for kid, (meta, upgrade) in zip(kids, await store.read_many(kids), strict=True)
        ]
        return [record for record in records if record is not None]

    async def exists(self, kid: str) -> bool:
        store = self._need_store()
        return kid in self._static or await store.exists(kid)

    async def revoke(self, kid: str) -> None:
        await self._need_store().update_meta(kid, {"revoked": "1"}, base=self._base(kid))
        self._cache.pop(kid, None)

    async def set_bypass(self, kid: str, bypass: bool) -> None:
        """Turn the key into a bypass key, or back (every replica within `cache_s`)."""
        await self._need_store().update_meta(
            kid, {"bypass": "1" if bypass else "0"}, base=self._base(kid)
        )
        self._cache.pop(kid, None)

    async def set_override(self, kid: str, fields: dict[str, Any]) -> None:
        """Replace the key's quota override (an empty dict clears it), in one transaction:
        a lookup never sees the old override half-replaced."""
        await self._need_store().update_meta(
            kid,
            {"q_" + k: str(v) for k, v in fields.items()},
            cleared=["q_" + f for f in QUOTA_FIELDS],
            base=self._base(kid),
        )
        self._cache.pop(kid, None)

    async def set_upgrade(self, kid: str, fields: dict[str, Any], *, expires_in_s: float) -> None:
        """A temporary quota upgrade that Redis forgets after `expires_in_s`."""
        await self._need_store().set_upgrade(
            kid, {k: str(v) for k, v in fields.items()}, expires_in_s=expires_in_s
        )
        self._cache.pop(kid, None)
