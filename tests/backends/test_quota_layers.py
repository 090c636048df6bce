"""Multi-layer quotas on every store: a key's own, its tenant's and its model's, checked and
taken in one call, all or none (README "Quota layers").

The stores: the memory one (the simulator's and the fail-open limiter's) and the Redis one on
one server, a 3-master Redis Cluster and Sentinel, each call's keys under the service's hash
tag (a tenant's, or the deployment's with a model layer) so one script sees every layer.
The replay drives the memory store and Redis with one random sequence over three layers and
compares every decision field by field.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from backends.redis.quota import QuotaStoreError, RedisQuotaStore
from policies.ratelimit import Quota
from scheduler.core.memory_quota import MemoryQuotaStore
from scheduler.core.quota_store import (
    ALGORITHM_KINDS,
    AlgorithmKind,
    QuotaLayer,
    QuotaSpec,
    QuotaStore,
    Reservation,
    Slot,
)
from tests.conftest import open_pipelined

STORES = ("memory", "single", "cluster", "sentinel")
TAG = "q"  # the deployment's tag, as the service has it with a model layer


@asynccontextmanager
async def open_store(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[QuotaStore]:
    if kind == "memory":
        yield MemoryQuotaStore()
        return
    fixture = {"single": "embedded_redis", "cluster": "redis_cluster", "sentinel": "redis_sentinel"}
    url = request.getfixturevalue(fixture[kind]).url
    async with open_pipelined(url) as (redis, pipeliner):
        prefix = f"layers-{uuid.uuid4().hex[:10]}"
        yield RedisQuotaStore(redis, prefix=prefix, pipeliner=pipeliner, min_ttl_s=600.0)


def spec(limit: int, algorithm: AlgorithmKind = "sliding_log") -> QuotaSpec:
    return QuotaSpec(algorithm, Quota(limit, 10.0))


async def used(
    store: QuotaStore, slot: Slot, s: QuotaSpec, *, layer: QuotaLayer | None, key: str = ""
) -> int:
    """Units counted on a quota now (a peek of its stored state, nothing taken)."""
    if isinstance(store, MemoryQuotaStore):
        name = "key" if layer is None else layer.name
        state = store.limiter(slot, s, name).state(key if layer is None else layer.scope)
    else:
        assert isinstance(store, RedisQuotaStore)
        state = await store.state(key or "peek", slot=slot, spec=s, layer=layer, tag=TAG)
    return s.quota.limit - s.rate_algorithm().take(state, now=0.0, cost=0)[0].remaining


layered = pytest.mark.parametrize("store_kind", STORES)


@layered
async def test_the_tenant_layer_refuses_keys_each_under_their_own(
    store_kind: str, request: pytest.FixtureRequest
) -> None:
    own, tenant = spec(3), QuotaLayer("tenant", "acme", requests=spec(4))
    async with open_store(store_kind, request) as store:
        for key in ("a", "a", "b", "b"):
            ok = await store.take(
                key, requests=own, tokens=None, token_cost=0, layers=[tenant], tag=TAG, now=0.0
            )
            assert ok.allowed
        refused = await store.take(
            "b", requests=own, tokens=None, token_cost=0, layers=[tenant], tag=TAG, now=0.0
        )
        assert not refused.allowed and refused.retry_after_s > 0
        assert refused.requests is not None and refused.requests.allowed  # b is under its own
        (layer,) = refused.layers
        assert layer.layer == tenant and not layer.fits
        assert layer.requests is not None and layer.requests.remaining == 0
        assert await used(store, "requests", own, layer=None, key="b") == 2  # nothing taken


@layered
async def test_the_model_layer_binds_across_tenants_and_takes_all_or_none(
    store_kind: str, request: pytest.FixtureRequest
) -> None:
    own = spec(100)
    model = QuotaLayer("model", "big", tokens=spec(100))

    def layers(tenant: str) -> list[QuotaLayer]:
        return [QuotaLayer("tenant", tenant, tokens=spec(80)), model]

    async with open_store(store_kind, request) as store:
        first = await store.take(
            "a", requests=None, tokens=own, token_cost=60, layers=layers("x"), tag=TAG, now=0.0
        )
        assert first.allowed and [d.fits for d in first.layers] == [True, True]
        second = await store.take(
            "b", requests=None, tokens=own, token_cost=50, layers=layers("y"), tag=TAG, now=0.0
        )
        assert not second.allowed
        assert [d.fits for d in second.layers] == [True, False]  # the model's contract binds
        assert second.tokens is not None and second.tokens.allowed
        # no layer was taken: b's own and tenant y's counters are as they were
        assert await used(store, "tokens", own, layer=None, key="b") == 0
        assert await used(store, "tokens", spec(80), layer=layers("y")[0]) == 0
        assert await used(store, "tokens", spec(100), layer=model) == 60
        # and a refusal by the key's own quota leaves the shared layers alone
        over = await store.take(
            "a", requests=None, tokens=own, token_cost=41, layers=layers("x"), tag=TAG, now=0.0
        )
        assert not over.allowed and over.tokens is not None and not over.tokens.allowed
        assert await used(store, "tokens", spec(80), layer=layers("x")[0]) == 60
        assert await used(store, "tokens", spec(100), layer=model) == 60


@layered
async def test_settle_and_refund_on_every_layer(
    store_kind: str, request: pytest.FixtureRequest
) -> None:
    requests, tokens = spec(5), spec(100)
    tenant = QuotaLayer("tenant", "acme", requests=spec(5), tokens=spec(100))
    model = QuotaLayer("model", "big", requests=spec(5), tokens=spec(100))
    async with open_store(store_kind, request) as store:
        decision = await store.take(
            "a",
            requests=requests,
            tokens=tokens,
            token_cost=80,
            layers=[tenant, model],
            tag=TAG,
            now=0.0,
        )
        assert decision.taken() == (tenant, model)
        hold = Reservation("a", requests, tokens, 80, layers=decision.taken(), tag=TAG)
        await hold.settle(store, used=30, failed=False, now=0.0)  # 50 back everywhere
        for layer in (None, tenant, model):
            assert await used(store, "tokens", tokens, layer=layer, key="a") == 30
            assert await used(store, "requests", requests, layer=layer, key="a") == 1
        again = await store.take(
            "a",
            requests=requests,
            tokens=tokens,
            token_cost=10,
            layers=[tenant, model],
            tag=TAG,
            now=0.0,
        )
        hold = Reservation("a", requests, tokens, 10, layers=again.taken(), tag=TAG)
        await hold.settle(store, used=0, failed=True, now=0.0)  # the backends failed it
        for layer in (None, tenant, model):
            assert await used(store, "tokens", tokens, layer=layer, key="a") == 30
            assert await used(store, "requests", requests, layer=layer, key="a") == 1
        ran_over = Reservation("a", requests, tokens, 0, layers=(tenant, model), tag=TAG)
        await ran_over.settle(store, used=20, failed=False, now=0.0)  # forced on every layer
        for layer in (None, tenant, model):
            assert await used(store, "tokens", tokens, layer=layer, key="a") == 50


@layered
async def test_a_shadow_layer_counts_what_fits_and_blocks_nothing(
    store_kind: str, request: pytest.FixtureRequest
) -> None:
    own = spec(10)
    shadow = QuotaLayer("tenant", "acme", requests=spec(2), enforce=False)
    async with open_store(store_kind, request) as store:
        fits = []
        for _ in range(4):
            d = await store.take(
                "a", requests=own, tokens=None, token_cost=0, layers=[shadow], tag=TAG, now=0.0
            )
            assert d.allowed and d.retry_after_s == 0
            fits.append(d.layers[0].fits)
        assert fits == [True, True, False, False]
        assert await used(store, "requests", spec(2), layer=shadow) == 2  # only what fitted
        assert await used(store, "requests", own, layer=None, key="a") == 4


@layered
async def test_credits_pay_for_the_keys_own_quota_only(
    store_kind: str, request: pytest.FixtureRequest
) -> None:
    own = spec(1)
    tenant = QuotaLayer("tenant", "acme", requests=spec(2))
    async with open_store(store_kind, request) as store:
        await store.add_credits("a", 100, ttl_s=3600.0, now=0.0, tag=TAG)

        async def take() -> Any:
            return await store.take(
                "a", requests=own, tokens=None, token_cost=5, layers=[tenant], tag=TAG, now=0.0
            )

        assert (await take()).credits_spent == 0
        paid = await take()  # over its own quota: paid with credits, the tenant's counted
        assert paid.allowed and paid.credits_spent == 5 and paid.taken() == (tenant,)
        assert await used(store, "requests", spec(2), layer=tenant) == 2
        refused = await take()  # the tenant's quota refuses: no balance pays for it
        assert not refused.allowed and refused.credits_spent == 0
        assert await store.credits("a", now=0.0, tag=TAG) == 95


async def replay(store: QuotaStore, algorithm: AlgorithmKind, seed: int) -> list[Any]:
    rng = random.Random(f"{seed}/{algorithm}")

    def q(limit: int) -> QuotaSpec:
        return QuotaSpec(algorithm, Quota(limit, 10.0))

    requests, tokens = q(2), q(60)
    model = QuotaLayer("model", "m", q(9), q(200))
    tenants = {t: QuotaLayer("tenant", t, q(3), q(150), enforce=t == "x") for t in ("x", "y")}
    now, seen = 1_000.0, list[Any]()
    for _ in range(150):
        now += rng.choice([0.0, 0.0, 0.5, 2.0, 7.5])
        key, tenant = rng.choice([("a", "x"), ("b", "x"), ("c", "y"), ("d", "y")])
        layers = [tenants[tenant], model]
        op = rng.choice(["take", "take", "take", "settle", "credits"])
        if op == "take":
            cost = rng.randint(0, 50)
            d = await store.take(
                key,
                requests=requests,
                tokens=tokens,
                token_cost=cost,
                layers=layers,
                tag=TAG,
                now=now,
            )
            seen.append((key, d))
            if d.allowed:
                hold = Reservation(key, requests, tokens, cost, d.credits_spent, d.taken(), TAG)
                await hold.settle(
                    store, used=rng.randint(0, 60), failed=rng.random() < 0.3, now=now
                )
        elif op == "credits":
            seen.append(
                await store.add_credits(key, rng.randint(1, 40), ttl_s=3600.0, now=now, tag=TAG)
            )
    return seen


@pytest.mark.parametrize("algorithm", ALGORITHM_KINDS)
async def test_memory_and_redis_decide_one_layered_replay_alike(
    algorithm: AlgorithmKind, request: pytest.FixtureRequest
) -> None:
    traces = []
    for kind in ("memory", "single"):
        async with open_store(kind, request) as store:
            traces.append(await replay(store, algorithm, 7))
    memory, redis = traces
    decisions = [d for _, d in (t for t in memory if isinstance(t, tuple))]
    assert memory == redis
    assert any(not d.allowed for d in decisions)
    assert any(not x.fits for d in decisions for x in d.layers if not x.layer.enforce)  # shadow
    assert any(d.credits_spent for d in decisions)


async def test_a_cluster_refuses_layers_spread_over_slots(request: pytest.FixtureRequest) -> None:
    """Why every call has one hash tag: without it a key's states and its tenant's are in two
    slots, and a Redis Cluster refuses the script (CROSSSLOT) rather than run it."""
    async with open_store("cluster", request) as store:
        tenant = QuotaLayer("tenant", "acme", requests=spec(4))
        with pytest.raises(QuotaStoreError, match=r"(?i)slot"):
            await store.take("a", requests=spec(3), tokens=None, token_cost=0, layers=[tenant])
