"""The Redis quota store on a real redis-server: the Lua twins against `policies`, TTLs and hash
tags, the combined decision with burst credits, settling, concurrency, Redis `TIME`, errors.

Decisions of a Lua twin must equal its Python algorithm's exactly (float equality, no
tolerance): both run the same float operations in the same order on the same state. The
differential tests use explicit, virtual times; since Redis expires keys in real time, they
floor TTLs at 10 minutes so no state vanishes in the middle of an example (a state kept past
its `ttl_s` changes no decision).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import coredis
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.redis.quota import (
    ALGORITHM_KINDS,
    AlgorithmKind,
    QuotaSpec,
    QuotaStoreError,
    QuotaStoreUnavailable,
    RedisQuotaStore,
)
from policies.ratelimit import TIME_EPSILON_S, CounterState, Quota, RateDecision
from tests.conftest import open_pipelined
from tests.policies.scenarios import quotas

DEADLINE_S = 10.0
EPOCH = 1.7e9  # Redis TIME's scale, where a float's ulp is about 2.4e-7 s


@asynccontextmanager
async def open_store(redis_url: str, **options: Any) -> AsyncIterator[RedisQuotaStore]:
    """A store on its own client and prefix (coredis: entered and left by this one task),
    pipelined as in the service; the stores built alone below cover the direct calls."""
    async with open_pipelined(redis_url) as (redis, pipeliner):
        prefix = f"test-{uuid.uuid4().hex[:10]}"
        yield RedisQuotaStore(redis, prefix=prefix, pipeliner=pipeliner, **options)


def fresh_key() -> str:
    return uuid.uuid4().hex


async def take_tokens(
    store: RedisQuotaStore, key: str, spec: QuotaSpec, cost: int, now: float
) -> RateDecision:
    decision = await store.take(
        key, requests=None, tokens=spec, token_cost=cost, burst_credits=False, now=now
    )
    assert decision.tokens is not None
    assert decision.allowed == decision.tokens.allowed
    return decision.tokens


# --- the differential test: Python algorithm vs Lua twin ----------------------------------------

origins = st.sampled_from([0.0, 12_345.678, EPOCH]) | st.floats(EPOCH, EPOCH + 1e8)


@st.composite
def operations(draw: st.DrawFn, quota: Quota) -> list[tuple[str, float, int]]:
    """(take | refund, time step, cost): steps of 0, below TIME_EPSILON_S, up to 1.5 periods,
    and a little backwards."""
    period_s = quota.period_s
    step = st.one_of(
        st.just(0.0),
        st.floats(0.0, TIME_EPSILON_S),
        st.floats(0.0, 1.5).map(lambda f: f * period_s),
        st.floats(-0.5, 0.0).map(lambda f: f * period_s),
    )
    op = st.sampled_from(["take", "take", "take", "refund"])
    cost = st.integers(0, max(quota.limit, quota.burst) + 1) | st.just(1)
    return draw(st.lists(st.tuples(op, step, cost), max_size=40))


@pytest.mark.parametrize("kind", ALGORITHM_KINDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), quota=quotas, origin=origins)
async def test_lua_twin_decides_and_refunds_like_python(
    redis_url: str, kind: AlgorithmKind, data: st.DataObject, quota: Quota, origin: float
) -> None:
    spec = QuotaSpec(kind, quota)
    algorithm = spec.rate_algorithm()
    key = fresh_key()
    state: Any = None
    now = origin
    with trio.fail_after(DEADLINE_S):
        async with open_store(redis_url, min_ttl_s=600.0) as store:
            for op, step, cost in data.draw(operations(quota)):
                now += step
                if op == "take":
                    expected, state = algorithm.take(state, now=now, cost=cost)
                    assert await take_tokens(store, key, spec, cost, now) == expected
                elif cost > 0:
                    state = algorithm.refund(state, now=now, cost=cost)
                    await store.settle(key, tokens=spec, reserved=cost, actual=0, now=now)
                stored = await store.state(key, slot="tokens", spec=spec)
                assert stored == (None if state == () else state)  # Redis has no empty list


# --- keys: TTLs, hash tags, bounds ---------------------------------------------------------------


async def all_keys(store: RedisQuotaStore, redis: coredis.Redis[bytes]) -> list[str]:
    return sorted(key.decode() for key in await redis.keys(store.key("*", "*")))


async def test_every_key_written_has_a_ttl_and_the_key_ids_hash_tag(redis_url: str) -> None:
    with trio.fail_after(DEADLINE_S):
        async with coredis.Redis.from_url(redis_url) as redis:
            store = RedisQuotaStore(redis, prefix=f"ttl-{uuid.uuid4().hex[:8]}")
            key = "tenant-7"
            await store.add_credits(key, 1_000, ttl_s=30.0)
            for kind in ALGORITHM_KINDS:
                requests = QuotaSpec(kind, Quota(limit=5, period_s=2.0))
                tokens = QuotaSpec(kind, Quota(limit=500, period_s=3.0))
                for cost in (100, 300, 300):  # the last one is refused: credits pay
                    await store.take(key, requests=requests, tokens=tokens, token_cost=cost)
                await store.settle(key, tokens=tokens, reserved=300, actual=50)
                await store.settle(key, tokens=tokens, reserved=100, actual=150)
            keys = await all_keys(store, redis)
            assert len(keys) == 7  # requests and tokens for 3 algorithms, credits
            for name in keys:
                assert name.split(":")[1] == "{tenant-7}"
                ttl_ms = await redis.pttl(name)
                assert 0 < ttl_ms <= 30_000, name
            assert await redis.pttl(store.key(key, "credits")) > 29_000
            log_ttl = await redis.pttl(store.key(key, "requests:sliding_log"))
            assert log_ttl <= 2_000  # the log's ttl_s: the newest entry's age-out


async def test_ttl_is_the_algorithms_ttl_rounded_up_to_ms(redis_url: str) -> None:
    spec = QuotaSpec("gcra", Quota(limit=3, period_s=1.0))
    with trio.fail_after(DEADLINE_S):
        async with coredis.Redis.from_url(redis_url) as redis:
            store = RedisQuotaStore(redis, prefix=f"ttl-{uuid.uuid4().hex[:8]}")
            decision = await store.take("k", requests=spec, tokens=None, token_cost=0)
            assert decision.requests is not None
            ttl_ms = await redis.pttl(store.state_key("k", "requests", spec))
            assert 300 <= ttl_ms <= 334  # TAT - now = 1/3 s, ceil -> 334 ms


async def test_the_log_stays_bounded_by_its_limit(redis_url: str) -> None:
    spec = QuotaSpec("sliding_log", Quota(limit=4, period_s=10.0))
    with trio.fail_after(DEADLINE_S):
        async with coredis.Redis.from_url(redis_url) as redis:
            store = RedisQuotaStore(redis, prefix=f"log-{uuid.uuid4().hex[:8]}")
            name = store.state_key("k", "tokens", spec)
            for step in range(60):
                now = EPOCH + step * 0.7
                await take_tokens(store, "k", spec, 1 + step % 2, now)
                await store.settle("k", tokens=spec, reserved=0, actual=step % 3, now=now)
                assert await redis.llen(name) <= spec.quota.limit


async def test_a_counter_written_under_another_period_reads_as_absent(redis_url: str) -> None:
    minute = QuotaSpec("sliding_counter", Quota(limit=5, period_s=60.0))
    hour = QuotaSpec("sliding_counter", Quota(limit=5, period_s=3600.0))
    with trio.fail_after(DEADLINE_S):
        async with open_store(redis_url) as store:
            assert (await take_tokens(store, "k", minute, 5, EPOCH)).remaining == 0
            assert (await take_tokens(store, "k", hour, 2, EPOCH)).remaining == 3
            assert await store.state("k", slot="tokens", spec=minute) is None
            assert await store.state("k", slot="tokens", spec=hour) == CounterState(
                int(EPOCH // 3600), 2, 0
            )


# --- Redis TIME ----------------------------------------------------------------------------------


async def test_redis_time_path_agrees_with_a_gcra_at_the_times_redis_used(redis_url: str) -> None:
    spec = QuotaSpec("gcra", Quota(limit=5, period_s=50.0, burst=3))  # T = 10 s
    algorithm = spec.rate_algorithm()
    state: Any = None
    with trio.fail_after(DEADLINE_S):
        async with open_store(redis_url) as store:
            decisions = [
                await store.take("k", requests=spec, tokens=None, token_cost=0) for _ in range(5)
            ]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert decisions[0].decided_at > EPOCH
    for decision in decisions:
        expected, state = algorithm.take(state, now=decision.decided_at)
        assert decision.requests == expected
    refused = decisions[3]
    assert 9.9 < refused.retry_after_s <= 10.0
    assert refused.requests is not None and refused.requests.remaining == 0


# --- what each algorithm admits in a window, measured through Redis ------------------------------


def window_schedule(start: float, period_s: float, interval_s: float) -> list[float]:
    """Demand above any quota: a crowd at `start`, then a request every quarter interval for
    three periods, with a second crowd halfway (all times exact floats at epoch scale)."""
    crowd = [start] * 25
    steady = [start + k * interval_s / 4 for k in range(1, int(12 * period_s / interval_s))]
    middle = [start + 1.5 * period_s] * 10
    return sorted(crowd + steady + middle)


def max_in_any_window(admitted_at: list[float], period_s: float) -> int:
    """The most admissions in a half-open window [s, s + period_s), over every s."""
    return max(sum(1 for b in admitted_at if a <= b < a + period_s) for a in admitted_at)


@pytest.mark.parametrize(
    ("spec", "bound"),
    [
        (QuotaSpec("sliding_log", Quota(limit=10, period_s=60.0)), 10),  # exact
        (QuotaSpec("gcra", Quota(limit=10, period_s=60.0)), 10 + 10 - 1),  # burst + limit - 1
        (QuotaSpec("gcra", Quota(limit=10, period_s=60.0, burst=4)), 4 + 10 - 1),
        (QuotaSpec("sliding_counter", Quota(limit=10, period_s=60.0)), 2 * 10 - 1),
    ],
    ids=["log", "gcra", "gcra-burst-4", "counter"],
)
async def test_the_most_a_window_holds_is_the_documented_bound(
    redis_url: str, spec: QuotaSpec, bound: int
) -> None:
    # issue 11: "10 requests per minute" let 20 through in a minute under the default (GCRA)
    period_s, interval_s = spec.quota.period_s, spec.quota.period_s / spec.quota.limit
    start = EPOCH + 17.0  # not on a window boundary
    reset_bound_s = interval_s * spec.quota.burst if spec.algorithm == "gcra" else period_s
    admitted_at: list[float] = []
    with trio.fail_after(DEADLINE_S * 3):
        async with open_store(redis_url, min_ttl_s=600.0) as store:
            key = fresh_key()
            for at in window_schedule(start, period_s, interval_s):
                decision = await store.take(key, requests=spec, tokens=None, token_cost=0, now=at)
                assert decision.requests is not None
                # the reset in the headers is never later than the window (the bucket's drain)
                assert 0 <= decision.requests.reset_after_s <= reset_bound_s, (at, decision)
                if decision.allowed:
                    admitted_at.append(at)
    most = max_in_any_window(admitted_at, period_s)
    if spec.algorithm == "sliding_counter":
        assert spec.quota.limit < most <= bound, most  # looser than the log, within its bound
    else:
        assert most == bound, most


# --- the combined decision, credits, settling ---------------------------------------------------

REQUESTS = QuotaSpec("sliding_log", Quota(limit=2, period_s=60.0))
TOKENS = QuotaSpec("gcra", Quota(limit=1_000, period_s=60.0))


async def test_both_or_neither(redis_url: str) -> None:
    now = EPOCH
    with trio.fail_after(DEADLINE_S):
        async with open_store(redis_url) as store:
            key = fresh_key()

            async def take(tokens: int) -> Any:
                return await store.take(
                    key, requests=REQUESTS, tokens=TOKENS, token_cost=tokens, now=now
                )

            refused_by_tokens = await take(1_001)
            assert not refused_by_tokens.allowed
            assert refused_by_tokens.requests.allowed
            assert not refused_by_tokens.tokens.allowed
            assert refused_by_tokens.retry_after_s == float("inf")
            assert await store.state(key, slot="requests", spec=REQUESTS) is None
            assert (await take(600)).allowed
            assert (await take(400)).allowed
            tat = await store.state(key, slot="tokens", spec=TOKENS)
            assert tat == pytest.approx(now + 60.0, abs=1e-6)
            refused_by_requests = await take(0)
            assert not refused_by_requests.allowed
            assert not refused_by_requests.requests.allowed
            assert refused_by_requests.tokens.allowed
            assert refused_by_requests.retry_after_s == 60.0
            assert await store.state(key, slot="tokens", spec=TOKENS) == tat


async def test_credits_are_spent_only_when_the_base_quota_refuses(redis_url: str) -> None:
    now = EPOCH
    with trio.fail_after(DEADLINE_S):
        async with open_store(redis_url) as store:
            key = fresh_key()
            assert await store.credits(key) == 0
            assert await store.add_credits(key, 500, ttl_s=60.0) == 500

            async def take(tokens: int, *, burst_credits: bool = True) -> Any:
                return await store.take(
                    key,
                    requests=REQUESTS,
                    tokens=TOKENS,
                    token_cost=tokens,
                    burst_credits=burst_credits,
                    now=now,
                )

            base = await take(900)
            assert (base.allowed, base.credits_spent, base.credits_left) == (True, 0, 500)
            tokens_before = await store.state(key, slot="tokens", spec=TOKENS)
            requests_before = await store.state(key, slot="requests", spec=REQUESTS)
            paid = await take(300)  # 900 + 300 > 1000: the token quota refuses
            assert (paid.allowed, paid.credits_spent, paid.credits_left) == (True, 300, 200)
            assert paid.retry_after_s == 0.0
            assert not paid.tokens.allowed and paid.requests.allowed
            assert await store.state(key, slot="tokens", spec=TOKENS) == tokens_before
            assert await store.state(key, slot="requests", spec=REQUESTS) == requests_before
            too_dear = await take(201)
            assert (too_dear.allowed, too_dear.credits_spent, too_dear.credits_left) == (
                False,
                0,
                200,
            )
            assert too_dear.retry_after_s > 0
            off = await take(201, burst_credits=False)
            assert (off.allowed, off.credits_spent, off.credits_left) == (False, 0, None)
            assert (await take(100)).allowed  # the base quota takes it, cost 1 request
            peek = await take(0)  # the request quota refuses: a peek still costs 1 credit
            assert (peek.allowed, peek.credits_spent, peek.credits_left) == (True, 1, 199)
            assert await store.credits(key) == 199


async def test_settle_refunds_and_takes_the_excess_without_refusing(redis_url: str) -> None:
    now = EPOCH
    algorithm = TOKENS.rate_algorithm()
    with trio.fail_after(DEADLINE_S):
        async with open_store(redis_url) as store:
            key = fresh_key()
            first = await store.take(key, requests=None, tokens=TOKENS, token_cost=800, now=now)
            assert first.allowed and first.tokens is not None and first.tokens.remaining == 200
            _, tat = algorithm.take(None, now=now, cost=800)
            await store.settle(key, tokens=TOKENS, reserved=800, actual=300, now=now)
            tat = algorithm.refund(tat, now=now, cost=500)
            assert tat is not None
            assert await store.state(key, slot="tokens", spec=TOKENS) == tat
            again = await take_tokens(store, key, TOKENS, 0, now)
            assert again.remaining == 700
            await store.settle(key, tokens=TOKENS, reserved=100, actual=1_200, now=now)
            forced = tat + TOKENS.quota.period_s / TOKENS.quota.limit * 1_100
            assert await store.state(key, slot="tokens", spec=TOKENS) == forced
            assert not (await take_tokens(store, key, TOKENS, 1, now)).allowed
            await store.settle(key, tokens=TOKENS, reserved=7, actual=7, now=now)  # no-op


async def test_settle_of_a_credit_paid_request_goes_to_the_balance(redis_url: str) -> None:
    now = EPOCH
    small = QuotaSpec("sliding_counter", Quota(limit=10, period_s=60.0))
    with trio.fail_after(DEADLINE_S):
        async with open_store(redis_url) as store:
            key = fresh_key()
            await store.add_credits(key, 100, ttl_s=60.0)
            paid = await store.take(key, requests=None, tokens=small, token_cost=50, now=now)
            assert paid.credits_spent == 50
            await store.settle(
                key, tokens=small, reserved=50, actual=20, paid_with_credits=True, now=now
            )
            assert await store.credits(key) == 80
            await store.settle(
                key, tokens=small, reserved=20, actual=103, paid_with_credits=True, now=now
            )
            assert await store.credits(key) == 0
            counters = await store.state(key, slot="tokens", spec=small)
            assert (
                isinstance(counters, CounterState) and counters.current == 3
            )  # what credits could not cover


@pytest.mark.parametrize("algorithm", ["gcra", "sliding_log", "sliding_counter"])
async def test_a_request_given_back_is_as_if_never_taken(redis_url: str, algorithm: str) -> None:
    now = EPOCH
    spec = QuotaSpec(algorithm, Quota(limit=3, period_s=60.0))  # type: ignore[arg-type]
    with trio.fail_after(DEADLINE_S):
        async with open_store(redis_url) as store:
            key = fresh_key()

            async def take() -> RateDecision:
                decision = await store.take(key, requests=spec, tokens=None, token_cost=0, now=now)
                assert decision.requests is not None
                return decision.requests

            assert [(await take()).remaining for _ in range(3)] == [2, 1, 0]
            assert not (await take()).allowed
            await store.give_back_request(key, requests=spec, now=now)
            assert (await take()).remaining == 0  # the unit given back, taken again
            assert not (await take()).allowed
            await store.add_credits(key, 10, ttl_s=60.0)
            paid = await store.take(key, requests=spec, tokens=None, token_cost=4, now=now)
            assert (paid.allowed, paid.credits_spent, await store.credits(key)) == (True, 4, 6)
            await store.give_back_request(key, requests=spec, credits=4, now=now)
            assert await store.credits(key) == 10
            assert not (await take()).allowed  # the base quota was never touched


async def test_credits_expire_at_the_later_grant(redis_url: str) -> None:
    with trio.fail_after(DEADLINE_S):
        async with coredis.Redis.from_url(redis_url) as redis:
            store = RedisQuotaStore(redis, prefix=f"cr-{uuid.uuid4().hex[:8]}")
            await store.add_credits("k", 5, ttl_s=100.0)
            assert await store.add_credits("k", 5, ttl_s=1.0) == 10
            assert await redis.pttl(store.key("k", "credits")) > 99_000


# --- concurrency ---------------------------------------------------------------------------------


@pytest.mark.parametrize("explicit_now", [True, False])
async def test_concurrent_takes_never_over_admit(redis_url: str, explicit_now: bool) -> None:
    spec = QuotaSpec("sliding_log", Quota(limit=10, period_s=600.0))
    allowed: list[bool] = []
    with trio.fail_after(DEADLINE_S):
        async with open_store(redis_url) as store:
            key = fresh_key()

            async def client() -> None:
                for _ in range(5):
                    decision = await store.take(
                        key,
                        requests=spec,
                        tokens=None,
                        token_cost=0,
                        now=EPOCH if explicit_now else None,
                    )
                    allowed.append(decision.allowed)

            async with trio.open_nursery() as nursery:
                for _ in range(40):
                    nursery.start_soon(client)
    assert len(allowed) == 200
    assert sum(allowed) == spec.quota.limit


# --- scripts and errors --------------------------------------------------------------------------


async def test_scripts_are_reloaded_after_a_flush(redis_url: str) -> None:
    spec = QuotaSpec("gcra", Quota(limit=3, period_s=1.0))
    with trio.fail_after(DEADLINE_S):
        async with coredis.Redis.from_url(redis_url) as redis:
            store = RedisQuotaStore(redis, prefix=f"ns-{uuid.uuid4().hex[:8]}")
            await store.load_scripts()
            await redis.script_flush()
            assert (await store.take("k", requests=spec, tokens=None, token_cost=0)).allowed


async def test_a_foreign_key_type_is_a_store_error(redis_url: str) -> None:
    spec = QuotaSpec("sliding_log", Quota(limit=3, period_s=1.0))
    with trio.fail_after(DEADLINE_S):
        async with coredis.Redis.from_url(redis_url) as redis:
            store = RedisQuotaStore(redis, prefix=f"err-{uuid.uuid4().hex[:8]}")
            await redis.set(store.state_key("k", "requests", spec), "not a list")
            with pytest.raises(QuotaStoreError) as caught:
                await store.take("k", requests=spec, tokens=None, token_cost=0)
            assert not isinstance(caught.value, QuotaStoreUnavailable)
            assert isinstance(caught.value.__cause__, coredis.exceptions.RedisError)


async def test_a_slow_redis_is_unavailable_then_recovers(redis_url: str) -> None:
    spec = QuotaSpec("gcra", Quota(limit=3, period_s=1.0))
    with trio.fail_after(DEADLINE_S):
        async with (
            coredis.Redis.from_url(redis_url) as redis,
            coredis.Redis.from_url(redis_url) as admin,
        ):
            store = RedisQuotaStore(redis, prefix=f"slow-{uuid.uuid4().hex[:8]}", timeout_s=0.05)
            await store.load_scripts()
            await admin.client_pause(300)
            with pytest.raises(QuotaStoreUnavailable):
                await store.take("k", requests=spec, tokens=None, token_cost=0, now=EPOCH)
            await trio.sleep(0.35)
            decision = await store.take("k", requests=spec, tokens=None, token_cost=0, now=EPOCH)
            assert decision.requests is not None
            assert decision.requests.limit == 3


async def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match=r"quota\.algorithm"):
        QuotaSpec("token_bucket", Quota(1, 1.0))  # type: ignore[arg-type]
    redis: coredis.Redis[bytes] = coredis.Redis()
    with pytest.raises(ValueError, match="prefix"):
        RedisQuotaStore(redis, prefix="a{b}")
    store = RedisQuotaStore(redis, prefix="p")
    assert store.key("abc", "credits") == "p:{abc}:credits"
    with pytest.raises(ValueError, match="key_id"):
        store.key("a}b", "credits")
    with pytest.raises(ValueError, match="token_cost"):
        await store.take("k", requests=None, tokens=None, token_cost=-1)
    with pytest.raises(ValueError, match="now"):
        await store.take("k", requests=None, tokens=None, token_cost=0, now=float("nan"))
    with pytest.raises(ValueError, match="amount"):
        await store.add_credits("k", 0, ttl_s=1.0)
    with pytest.raises(ValueError, match="actual"):
        await store.settle("k", tokens=TOKENS, reserved=1, actual=-1)
