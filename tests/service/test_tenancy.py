"""The key registry against a real Redis: lookups in one pipelined round trip, and a cache
that the garbage collector does not have to walk."""

from __future__ import annotations

import gc
import uuid

import trio

from backends.redis.keys import RedisKeyStore
from scheduler.service.quota import AdaptiveTimeout
from scheduler.service.tenancy import KeyRegistry
from tests.conftest import open_pipelined

DEADLINE_S = 10.0


async def test_looked_up_records_are_cached_as_untracked_values(redis_url: str) -> None:
    """Why it matters: a cache of 100,000 records as objects made each full collection take
    about 70 ms on this machine, longer than the Redis timeout of every call in flight."""
    with trio.fail_after(DEADLINE_S):
        async with open_pipelined(redis_url) as (_, pipeliner):
            registry = KeyRegistry((), b"secret")
            registry.store = RedisKeyStore(pipeliner, prefix=f"test-{uuid.uuid4().hex[:8]}")
            created = [
                await registry.create(f"t{i}", "pro", bypass=False, created_unix=0.0)
                for i in range(20)
            ]
            await registry.set_override(created[0][1].key_id, {"requests": 7, "period_s": 30.0})
            now = trio.current_time()
            records = [await registry.lookup(record.key_id, now=now) for _, record in created]
            assert [r.tenant if r else None for r in records] == [f"t{i}" for i in range(20)]
            first = await registry.lookup(created[0][1].key_id, now=now)  # from the cache
            assert first is not None and dict(first.override) == {"requests": 7, "period_s": 30}
            for _ in range(3):  # a collection untracks a tuple whose items it found untracked
                gc.collect()
            assert not [v for v in registry._cache.values() if gc.is_tracked(v)]
            assert pipeliner.round_trips == len(created)  # one per lookup, both hashes in it


async def test_while_an_expired_record_is_fetched_the_others_go_on_with_it(
    redis_url: str,
) -> None:
    """A burst on a key whose cached record just expired: one lookup fetches it (here held
    up by `CLIENT PAUSE`), the others answer at once with the record Redis gave last."""
    with trio.fail_after(DEADLINE_S):
        async with open_pipelined(redis_url) as (redis, pipeliner):
            registry = KeyRegistry((), b"secret", cache_s=1.0, timeout=AdaptiveTimeout(0.5))
            registry.store = RedisKeyStore(pipeliner, prefix=f"test-{uuid.uuid4().hex[:8]}")
            _, record = await registry.create("t", "pro", bypass=False, created_unix=0.0)
            now = trio.current_time()
            assert await registry.lookup(record.key_id, now=now) is not None  # cached
            later = now + 2.0  # expired
            answered_at: list[float] = []

            async def lookup() -> None:
                found = await registry.lookup(record.key_id, now=later)
                assert found is not None and found.tenant == "t"
                answered_at.append(trio.current_time())

            await redis.client_pause(300)
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(lookup)
            waited = sorted(t - started for t in answered_at)
            assert waited[-1] >= 0.25  # the one that fetched waited for Redis
            assert waited[:4] == [w for w in waited[:4] if w < 0.1]  # the others did not
