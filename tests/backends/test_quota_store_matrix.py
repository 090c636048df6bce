"""Every quota algorithm on every `QuotaStore`, to the same decisions (the `limits` pattern).

The stores are the in-memory one (the simulator's and the fail-open limiter's) and the Redis
one on a real redis-server (the service's, through the pipeliner). Each behaviour test runs on
the matrix algorithm x store and asserts what the README promises: requests and tokens taken
both or neither, a reservation settled down and up, burst credits spent and settled, a failed
call's request given back. The replay test then drives both stores with one random sequence of
every call and compares every decision field by field (floats exactly: the Lua twins repeat
the Python float operations).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from backends.redis.quota import RedisQuotaStore
from policies.ratelimit import Quota
from scheduler.core.memory_quota import MemoryQuotaStore
from scheduler.core.quota_store import (
    ALGORITHM_KINDS,
    AlgorithmKind,
    QuotaDecision,
    QuotaSpec,
    QuotaStore,
)
from tests.conftest import open_pipelined

STORES = ("memory", "redis")
CREDITS_TTL_S = 3600.0  # far beyond the virtual times used: no balance expires mid-test


@asynccontextmanager
async def open_store(kind: str, redis_url: str) -> AsyncIterator[QuotaStore]:
    if kind == "memory":
        yield MemoryQuotaStore()
        return
    async with open_pipelined(redis_url) as (redis, pipeliner):
        prefix = f"matrix-{uuid.uuid4().hex[:10]}"
        # TTLs floored at 10 min: Redis expires in real time, the test runs in virtual time
        yield RedisQuotaStore(redis, prefix=prefix, pipeliner=pipeliner, min_ttl_s=600.0)


def specs(algorithm: AlgorithmKind) -> tuple[QuotaSpec, QuotaSpec]:
    return QuotaSpec(algorithm, Quota(3, 10.0)), QuotaSpec(algorithm, Quota(100, 10.0))


matrix = pytest.mark.parametrize(
    ("store_kind", "algorithm"), [(s, a) for s in STORES for a in ALGORITHM_KINDS]
)


@matrix
async def test_requests_and_tokens_both_or_neither(
    store_kind: str, algorithm: AlgorithmKind, redis_url: str
) -> None:
    requests, tokens = specs(algorithm)
    async with open_store(store_kind, redis_url) as store:
        first = await store.take("k", requests=requests, tokens=tokens, token_cost=90, now=0.0)
        assert first.allowed and first.tokens is not None and first.tokens.remaining == 10
        refused = await store.take("k", requests=requests, tokens=tokens, token_cost=20, now=0.0)
        assert not refused.allowed and refused.tokens is not None and not refused.tokens.allowed
        assert refused.requests is not None and refused.requests.allowed
        # the refused take left the request quota alone: two more requests still fit
        for _ in range(2):
            ok = await store.take("k", requests=requests, tokens=tokens, token_cost=1, now=0.0)
            assert ok.allowed
        spent = await store.take("k", requests=requests, tokens=None, token_cost=0, now=0.0)
        assert not spent.allowed and spent.retry_after_s > 0


@matrix
async def test_a_reservation_settles_down_and_up(
    store_kind: str, algorithm: AlgorithmKind, redis_url: str
) -> None:
    _, tokens = specs(algorithm)
    async with open_store(store_kind, redis_url) as store:
        await store.take("k", requests=None, tokens=tokens, token_cost=80, now=0.0)
        await store.settle("k", tokens=tokens, reserved=80, actual=30, now=0.0)
        peek = await store.take("k", requests=None, tokens=tokens, token_cost=0, now=0.0)
        assert peek.tokens is not None and peek.tokens.remaining == 70
        await store.settle("k", tokens=tokens, reserved=10, actual=60, now=0.0)  # ran over
        peek = await store.take("k", requests=None, tokens=tokens, token_cost=0, now=0.0)
        assert peek.tokens is not None and peek.tokens.remaining == 20


@matrix
async def test_burst_credits_admit_and_settle(
    store_kind: str, algorithm: AlgorithmKind, redis_url: str
) -> None:
    requests, tokens = specs(algorithm)
    async with open_store(store_kind, redis_url) as store:
        assert await store.add_credits("k", 50, ttl_s=CREDITS_TTL_S, now=0.0) == 50
        await store.take("k", requests=requests, tokens=tokens, token_cost=100, now=0.0)
        paid = await store.take("k", requests=requests, tokens=tokens, token_cost=40, now=0.0)
        assert paid.allowed and paid.credits_spent == 40 and paid.credits_left == 10
        await store.settle(
            "k", tokens=tokens, reserved=40, actual=25, paid_with_credits=True, now=0.0
        )
        assert await store.credits("k", now=0.0) == 25
        await store.settle(
            "k", tokens=tokens, reserved=0, actual=30, paid_with_credits=True, now=0.0
        )
        assert await store.credits("k", now=0.0) == 0  # 25 from the balance, 5 forced on tokens
        refused = await store.take("k", requests=requests, tokens=tokens, token_cost=1, now=0.0)
        assert not refused.allowed and refused.credits_left == 0


@matrix
async def test_a_failed_call_gives_its_request_back(
    store_kind: str, algorithm: AlgorithmKind, redis_url: str
) -> None:
    requests, _ = specs(algorithm)
    async with open_store(store_kind, redis_url) as store:
        for _ in range(3):
            await store.take("k", requests=requests, tokens=None, token_cost=0, now=1.0)
        await store.give_back_request("k", requests=requests, now=1.0)
        again = await store.take("k", requests=requests, tokens=None, token_cost=0, now=1.0)
        assert again.allowed
        spent = await store.take("k", requests=requests, tokens=None, token_cost=0, now=1.0)
        assert not spent.allowed


async def replay(store: QuotaStore, algorithm: AlgorithmKind, seed: int) -> list[Any]:
    """One random sequence of every call; what each call returned."""
    rng = random.Random(f"{seed}/{algorithm}")
    requests, tokens = specs(algorithm)
    now, last = 1_000.0, None
    seen: list[Any] = []
    for _ in range(120):
        now += rng.choice([0.0, 0.0, 0.5, 2.0, 7.5])
        key = rng.choice(["a", "b"])
        op = rng.choice(["take", "take", "take", "settle", "give_back", "credits"])
        if op == "take":
            last = await store.take(
                key, requests=requests, tokens=tokens, token_cost=rng.randint(0, 60), now=now
            )
            seen.append((key, last))
        elif op == "settle" and isinstance(last, QuotaDecision):
            paid = last.credits_spent > 0
            reserved, actual = rng.randint(0, 60), rng.randint(0, 90)
            await store.settle(
                key,
                tokens=tokens,
                reserved=reserved,
                actual=actual,
                paid_with_credits=paid,
                now=now,
            )
        elif op == "give_back":
            await store.give_back_request(
                key, requests=requests, credits=rng.choice([0, 5]), now=now
            )
        else:
            seen.append(
                await store.add_credits(key, rng.randint(1, 40), ttl_s=CREDITS_TTL_S, now=now)
            )
            seen.append(await store.credits(key, now=now))
    return seen


@pytest.mark.parametrize("algorithm", ALGORITHM_KINDS)
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_both_stores_decide_one_replay_alike(
    algorithm: AlgorithmKind, seed: int, redis_url: str
) -> None:
    traces = []
    for kind in STORES:
        async with open_store(kind, redis_url) as store:
            traces.append(await replay(store, algorithm, seed))
    memory, redis = traces
    assert len(memory) > 60
    assert any(isinstance(d, tuple) and not d[1].allowed for d in memory)  # refusals happen
    assert any(isinstance(d, tuple) and d[1].credits_spent for d in memory)  # credits pay
    assert memory == redis
