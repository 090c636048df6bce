"""The key registry's storage in Redis: its key layout, and its commands in Redis's terms.

Layout (the key id in a hash tag, as for the quotas):

    <prefix>:{<key_id>}:meta      hash: tenant, tier, bypass, revoked, created, quota overrides
    <prefix>:{<key_id>}:upgrade   hash: temporary quota fields; its TTL is the upgrade's expiry
    <prefix>:keys                 set of the key ids created through the admin API

What the fields mean is the registry's (`scheduler.service.tenancy`); this module only stores
them. Every failure of Redis is raised as `RedisUnavailable`, translated here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import coredis

from backends.redis.errors import translated_redis_errors
from backends.redis.pipeliner import RedisPipeliner

Hashes = tuple[dict[str, str], dict[str, str]]  # a key's meta and upgrade hashes
LIST_CHUNK = 500  # key ids read per round trip by `read_many`


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


class RedisKeyStore:
    """The key registry's hashes and id set; raises only `RedisUnavailable`."""

    def __init__(self, pipeliner: RedisPipeliner, *, prefix: str) -> None:
        self._pipeliner = pipeliner
        self._prefix = prefix

    @property
    def _redis(self) -> coredis.Redis[Any]:
        return self._pipeliner.redis

    def _key(self, key_id: str, role: str) -> str:
        return f"{self._prefix}:{{{key_id}}}:{role}"

    async def read(self, key_id: str, *, timeout_s: float) -> Hashes:
        """The key's meta and upgrade hashes, in one round trip."""
        meta_key, upgrade_key = self._key(key_id, "meta"), self._key(key_id, "upgrade")
        with translated_redis_errors():
            meta, upgrade = await self._pipeliner.execute_each(
                [lambda pipe: pipe.hgetall(meta_key), lambda pipe: pipe.hgetall(upgrade_key)],
                timeout_s=timeout_s,
            )
        return _decode(meta), _decode(upgrade)

    async def create(self, key_id: str, meta: Mapping[str, str]) -> None:
        """Write the key's meta hash and add it to the id set."""
        with translated_redis_errors():
            await self._redis.hset(self._key(key_id, "meta"), dict(meta))
            await self._redis.sadd(f"{self._prefix}:keys", [key_id])

    async def ids(self) -> set[str]:
        """The ids of the keys created through the admin API."""
        with translated_redis_errors():
            return {_text(m) for m in await self._redis.smembers(f"{self._prefix}:keys")}

    async def read_many(self, key_ids: Sequence[str]) -> list[Hashes]:
        """Every key's hashes, in order, a round trip per `LIST_CHUNK` keys."""
        hashes: list[Hashes] = []
        with translated_redis_errors():
            for start in range(0, len(key_ids), LIST_CHUNK):
                async with self._redis.pipeline(transaction=False) as pipe:
                    replies = [
                        (
                            pipe.hgetall(self._key(kid, "meta")),
                            pipe.hgetall(self._key(kid, "upgrade")),
                        )
                        for kid in key_ids[start : start + LIST_CHUNK]
                    ]
                hashes.extend([(_decode(await m), _decode(await u)) for m, u in replies])
        return hashes

    async def exists(self, key_id: str) -> bool:
        """Whether the key has a meta hash."""
        with translated_redis_errors():
            return bool(await self._redis.exists([self._key(key_id, "meta")]))

    def _base_meta(self, pipe: Any, key_id: str, base: tuple[str, str] | None) -> None:
        """A config key's tenant and tier, written the first time its meta hash is."""
        if base is not None:
            pipe.hsetnx(self._key(key_id, "meta"), "tenant", base[0])
            pipe.hsetnx(self._key(key_id, "meta"), "tier", base[1])

    async def update_meta(
        self,
        key_id: str,
        fields: Mapping[str, str],
        *,
        cleared: Iterable[str] = (),
        base: tuple[str, str] | None = None,
    ) -> None:
        """In one transaction: the `base` tenant and tier where the hash has none, the
        `cleared` fields deleted, then `fields` set (a lookup never sees it half-changed)."""
        meta = self._key(key_id, "meta")
        cleared = list(cleared)
        with translated_redis_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                self._base_meta(pipe, key_id, base)
                if cleared:
                    pipe.hdel(meta, cleared)
                if fields:
                    pipe.hset(meta, dict(fields))

    async def set_upgrade(
        self, key_id: str, fields: Mapping[str, str], *, expires_in_s: float
    ) -> None:
        """Replace the key's upgrade hash, which Redis forgets after `expires_in_s`."""
        key = self._key(key_id, "upgrade")
        with translated_redis_errors():
            async with self._redis.pipeline(transaction=True) as pipe:  # never seen half-written
                pipe.delete([key])
                pipe.hset(key, dict(fields))
                pipe.pexpire(key, max(1, math.ceil(expires_in_s * 1000)))
