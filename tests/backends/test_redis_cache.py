"""The response cache on a real redis-server: the canonical request, scope isolation, fresh to
stale to gone, the stored value, size bounds, errors.

Cache times are explicit unix seconds (`now_unix`); only the Redis TTL runs in real time, and
the one test that waits for it polls under a deadline.
"""

from __future__ import annotations

import json
import random
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import coredis
import msgpack  # type: ignore[import-untyped]
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from backends.redis.cache import (
    CACHE_KEY_FIELDS,
    CacheError,
    CacheUnavailable,
    ResponseCache,
    canonical_request,
    request_digest,
)
from scheduler.core.cache import CacheHit
from tests.conftest import open_pipelined

DEADLINE_S = 5.0
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
NOW = 1_700_000_000.0
BODY: dict[str, Any] = {
    "model": "llama-3-8b",
    "messages": [{"role": "user", "content": "Say hello."}],
    "temperature": 0.0,
    "max_tokens": 16,
}
EXCLUDED = ["stream", "stream_options", "user", "metadata", "store", "cache_key", "salt"]
EXCLUDED += ["prompt_cache_key", "cache_salt", "service_tier", "x_request_id"]


@asynccontextmanager
async def open_cache(redis_url: str, **options: Any) -> AsyncIterator[ResponseCache]:
    """A cache on its own client and prefix (coredis: entered and left by this one task),
    pipelined as in the service; the caches built alone below cover the direct calls."""
    async with open_pipelined(redis_url) as (redis, pipeliner):
        prefix = f"test-{uuid.uuid4().hex[:10]}"
        yield ResponseCache(redis, prefix=prefix, pipeliner=pipeliner, **options)


async def put(cache: ResponseCache, scope: str, response: bytes, **options: Any) -> None:
    times = {"now_unix": NOW, "fresh_s": 60.0, "stale_s": 600.0} | options
    await cache.put(scope, CHAT, BODY, response, **times)


# --- the canonical request ----------------------------------------------------------------------


def test_canonical_form_is_sorted_compact_json_of_route_and_allowed_fields() -> None:
    body = {"temperature": 0.5, "model": "m", "stream": True, "user": "u", "salt": "s"}
    canonical = canonical_request(CHAT, body)
    assert (
        canonical == b'{"request":{"model":"m","temperature":0.5},"route":"/v1/chat/completions"}'
    )
    assert len(request_digest(CHAT, body)) == 64


def test_canonical_form_ignores_transport_client_and_unknown_fields() -> None:
    noisy = dict(BODY, stream=True, stream_options={"include_usage": True}, user="alice")
    noisy |= {"metadata": {"a": "b"}, "store": True, "cache_key": "mine", "salt": "x"}
    noisy |= {"prompt_cache_key": "k", "cache_salt": "y", "whatever": [1, 2], "seed": None}
    assert canonical_request(CHAT, noisy) == canonical_request(CHAT, BODY)


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.7},
        {"model": "llama-3-70b"},
        {"messages": [{"role": "user", "content": "Say goodbye."}]},
        {"max_tokens": 17},
        {"seed": 1},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"top_k": 5},
    ],
)
def test_canonical_form_changes_with_what_changes_the_answer(change: dict[str, Any]) -> None:
    assert canonical_request(CHAT, BODY | change) != canonical_request(CHAT, BODY)


def test_canonical_form_changes_with_the_route() -> None:
    assert canonical_request(CHAT, BODY) != canonical_request(COMPLETIONS, BODY)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
allowed_bodies = st.dictionaries(st.sampled_from(sorted(CACHE_KEY_FIELDS)), json_values)
excluded_fields = st.dictionaries(
    st.sampled_from(EXCLUDED) | st.text(max_size=8).filter(lambda k: k not in CACHE_KEY_FIELDS),
    json_values,
)


def reordered(value: Any, rnd: random.Random) -> Any:
    """`value` with every dict's keys in a shuffled order."""
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: reordered(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [reordered(v, rnd) for v in value]
    return value


@given(body=allowed_bodies, extra=excluded_fields, rnd=st.randoms(use_true_random=False))
def test_canonical_form_is_invariant_under_key_order_and_excluded_fields(
    body: dict[str, Any], extra: dict[str, Any], rnd: random.Random
) -> None:
    noisy = reordered(extra | body, rnd)
    assert canonical_request(CHAT, noisy) == canonical_request(CHAT, body)
    assert json.loads(canonical_request(CHAT, body))["request"].keys() <= CACHE_KEY_FIELDS


# --- the cache on Redis -------------------------------------------------------------------------


async def test_a_stored_response_is_served_fresh_then_stale(redis_url: str) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_cache(redis_url) as cache:
            assert await cache.get("tenant-a", CHAT, BODY, now_unix=NOW) is None
            await put(cache, "tenant-a", b'{"ok":1}', content_type="application/json")
            noisy = dict(reversed(list(BODY.items())), stream=True, user="someone-else")
            hit = await cache.get("tenant-a", CHAT, noisy, now_unix=NOW + 10)
            assert hit == CacheHit(b'{"ok":1}', "application/json", stale=False, age_s=10.0)
            hit = await cache.get("tenant-a", CHAT, BODY, now_unix=NOW + 60)
            assert hit is not None and hit.stale and hit.age_s == 60.0
            hit = await cache.get("tenant-a", CHAT, BODY, now_unix=NOW - 5)  # a slow clock
            assert hit is not None and not hit.stale and hit.age_s == 0.0
            other = BODY | {"temperature": 1.0}
            assert await cache.get("tenant-a", CHAT, other, now_unix=NOW) is None


async def test_a_scope_never_reads_another_scopes_entry(redis_url: str) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_cache(redis_url) as cache:
            await put(cache, "tenant-a", b"for a")
            for scope in ("tenant-b", "tenant-a ", "Tenant-a", "shared:llama-3-8b"):
                assert await cache.get(scope, CHAT, BODY, now_unix=NOW) is None
            await put(cache, "tenant-b", b"for b")
            hit_a = await cache.get("tenant-a", CHAT, BODY, now_unix=NOW)
            hit_b = await cache.get("tenant-b", CHAT, BODY, now_unix=NOW)
            assert hit_a is not None and hit_a.body == b"for a"
            assert hit_b is not None and hit_b.body == b"for b"


async def test_an_entry_is_checked_against_its_full_scope(redis_url: str) -> None:
    """Even when two scopes' short key prefixes collided, the value's full digest tells them
    apart: copy A's value under B's key, B still misses."""
    with trio.fail_after(DEADLINE_S):
        async with open_cache(redis_url) as cache:
            await put(cache, "tenant-a", b"for a")
            value = await cache._redis.get(cache.key("tenant-a", CHAT, BODY))
            assert value is not None
            await cache._redis.set(cache.key("tenant-b", CHAT, BODY), value)
            assert await cache.get("tenant-b", CHAT, BODY, now_unix=NOW) is None


async def test_the_value_is_msgpack_with_a_ttl_of_fresh_plus_stale(redis_url: str) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_cache(redis_url) as cache:
            await put(cache, "t", b"\x00binary", fresh_s=30.0, stale_s=90.0, content_type="a/b")
            key = cache.key("t", CHAT, BODY)
            assert key.startswith(cache._prefix + ":") and len(key.split(":")[-1]) == 64
            assert len(key.split(":")[-2]) == 16
            raw = await cache._redis.get(key)
            entry = msgpack.unpackb(raw, raw=False)
            assert entry["body"] == b"\x00binary"
            assert entry["content_type"] == "a/b"
            assert entry["created"] == NOW
            assert entry["fresh_until"] == NOW + 30.0
            assert 110_000 < await cache._redis.pttl(key) <= 120_000


async def test_an_entry_is_gone_when_its_redis_ttl_runs_out(redis_url: str) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_cache(redis_url) as cache:
            await put(cache, "t", b"short-lived", fresh_s=0.05, stale_s=0.1)
            assert await cache.get("t", CHAT, BODY, now_unix=NOW) is not None
            while await cache.get("t", CHAT, BODY, now_unix=NOW) is not None:
                await trio.sleep(0.02)


async def test_oversized_responses_are_not_stored(redis_url: str) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_cache(redis_url, max_bytes=10) as cache:
            await put(cache, "t", b"x" * 11)
            assert await cache.get("t", CHAT, BODY, now_unix=NOW) is None
            assert await cache._redis.exists([cache.key("t", CHAT, BODY)]) == 0
            await put(cache, "t", b"x" * 10)
            assert await cache.get("t", CHAT, BODY, now_unix=NOW) is not None


async def test_an_undecodable_entry_is_a_miss(redis_url: str) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_cache(redis_url) as cache:
            key = cache.key("t", CHAT, BODY)
            for value in (b"\xc1 not msgpack", msgpack.packb([1, 2]), msgpack.packb({"a": 1})):
                await cache._redis.set(key, value)
                assert await cache.get("t", CHAT, BODY, now_unix=NOW) is None


async def test_a_foreign_key_type_is_a_cache_error(redis_url: str) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_cache(redis_url) as cache:
            await cache._redis.rpush(cache.key("t", CHAT, BODY), ["a list"])
            with pytest.raises(CacheError) as caught:
                await cache.get("t", CHAT, BODY, now_unix=NOW)
            assert not isinstance(caught.value, CacheUnavailable)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_an_unreachable_redis_is_unavailable_quickly() -> None:
    with trio.fail_after(2.0):
        async with coredis.Redis.from_url(f"redis://127.0.0.1:{closed_port()}") as redis:
            cache = ResponseCache(redis, timeout_s=0.5)
            with pytest.raises(CacheUnavailable):
                await cache.get("t", CHAT, BODY, now_unix=NOW)
            with pytest.raises(CacheUnavailable):
                await put(cache, "t", b"x")


async def test_a_slow_redis_is_unavailable(redis_url: str) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            open_cache(redis_url, timeout_s=0.05) as cache,
            coredis.Redis.from_url(redis_url) as admin,
        ):
            await cache.get("t", CHAT, BODY, now_unix=NOW)  # connected before the pause
            await admin.client_pause(300)
            with pytest.raises(CacheUnavailable, match="within"):
                await cache.get("t", CHAT, BODY, now_unix=NOW)


async def test_arguments_are_validated() -> None:
    redis: coredis.Redis[bytes] = coredis.Redis()
    with pytest.raises(ValueError, match="prefix"):
        ResponseCache(redis, prefix="")
    with pytest.raises(ValueError, match="timeout_s"):
        ResponseCache(redis, timeout_s=0)
    with pytest.raises(ValueError, match="max_bytes"):
        ResponseCache(redis, max_bytes=-1)
    cache = ResponseCache(redis)
    with pytest.raises(ValueError, match="scope"):
        cache.key("", CHAT, BODY)
    with pytest.raises(ValueError, match="now_unix"):
        await cache.get("t", CHAT, BODY, now_unix=float("nan"))
    with pytest.raises(ValueError, match="stale_s"):
        await put(cache, "t", b"x", stale_s=-1.0)
    with pytest.raises(ValueError, match=r"fresh_s \+ stale_s"):
        await put(cache, "t", b"x", fresh_s=0.0, stale_s=0.0)
