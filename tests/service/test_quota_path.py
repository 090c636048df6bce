"""The quota on the request path, through real sockets and a real Redis.

Rate-limit headers on every answer, 429 with Retry-After once a key's quota is used up, the token
quota refusing what it could never hold, reservations settled to the real usage, and the response
cache of the shed ladder kept per tenant whatever the client puts in its body.

Every test uses fresh keys (a random suffix), so the quota states in the session's Redis start
empty; a key's quota lives in the config file written for that test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import coredis
import httpx2
import pytest
import trio
from openai.types.chat import ChatCompletion

from backends.redis.cache import ResponseCache
from backends.redis.quota import RedisQuotaStore
from policies.breaker import ScopedBreakers
from scheduler.models.gpu import GpuConfig
from scheduler.openai.body import read_call
from scheduler.service.config import Settings, key_id, load_settings
from scheduler.service.gateway import PATHS
from scheduler.service.quota import (
    AdaptiveTimeout,
    FailMode,
    QuotaGuard,
    QuotaHold,
    QuotaSettings,
    Source,
    Verdict,
    _pruned,
)
from scheduler.service.serve import with_demo_url
from tests.conftest import start_demo, start_gateway
from tests.support.error_shape import error_fields
from tests.support.fault_proxy import Fault, FaultProxy, serve_fault_proxy

DEFAULT_MAX_TOKENS = 256  # the gateway's server.default_max_tokens
METERED = """
[tiers.metered]
weight = 1
max_wait_s = 5
max_depth = 100
[tiers.metered.quota]
algorithm = "sliding_log"
period_s = 60
requests = {requests}
tokens = {tokens}

[[keys]]
key = "{key}"
tenant = "t-{key}"
tier = "metered"

[models.demo-small]
backends = ["demo"]
"""
DURATION = re.compile(r"^(\d+ms|\d+s|\d+m\d+s)$")


def fresh_key(role: str) -> str:
    return f"sk-{role}-{uuid.uuid4().hex}"


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "demo-small", "messages": [{"role": "user", "content": content}], **extra}


def estimate(body: dict[str, Any]) -> int:
    """The tokens the gateway reserves for `body` (prompt estimate plus max_tokens)."""
    call = read_call("chat", json.dumps(body).encode(), default_max_tokens=DEFAULT_MAX_TOKENS)
    return int(call.cost)


def settings_from(tmp_path: Path, text: str, demo: str, redis_url: str) -> Settings:
    path = tmp_path / "scheduler.toml"
    path.write_text(text)
    settings = load_settings(path, env={}, overrides={"port": 0})
    return dataclasses.replace(with_demo_url(settings, demo), redis_url=redis_url)


async def metered_gateway(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str, key: str, *, requests: int, tokens: int
) -> str:
    demo = await start_demo(nursery)
    text = METERED.format(requests=requests, tokens=tokens, key=key)
    return await start_gateway(nursery, settings_from(tmp_path, text, demo, redis_url))


def assert_key_not_leaked(response: httpx2.Response, key: str) -> None:
    for name, value in response.headers.items():
        assert key not in name and key not in value, (name, value)
    assert key.encode() not in response.content


def assert_openai_error(response: httpx2.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == error_fields(status)
    assert error["message"]
    return dict(error)


async def test_a_200_carries_every_rate_limit_header(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    key = fresh_key("headers")
    gateway = await metered_gateway(nursery, tmp_path, redis_url, key, requests=3, tokens=2000)
    body = chat(max_tokens=8)
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            r = await client.post(
                gateway + "/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {key}"},
            )
            wrong = await client.post(
                gateway + "/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {key}-wrong"},
            )
    assert_openai_error(wrong, 401)
    assert_key_not_leaked(wrong, f"{key}-wrong")
    assert r.status_code == 200, r.text
    h = r.headers
    assert h["x-ratelimit-limit-requests"] == "3"
    assert h["x-ratelimit-remaining-requests"] == "2"
    assert DURATION.match(h["x-ratelimit-reset-requests"]), h["x-ratelimit-reset-requests"]
    assert h["x-ratelimit-limit-tokens"] == "2000"
    assert h["x-ratelimit-remaining-tokens"] == str(2000 - estimate(body))
    assert DURATION.match(h["x-ratelimit-reset-tokens"]), h["x-ratelimit-reset-tokens"]
    assert h["ratelimit-policy"] == '"requests";q=3;w=60, "tokens";q=2000;w=60'
    remaining_tokens = 2000 - estimate(body)
    assert re.fullmatch(
        rf'"requests";r=2;t=\d+, "tokens";r={remaining_tokens};t=\d+', h["ratelimit"]
    ), h["ratelimit"]
    assert "x-ratelimit-source" not in h  # decided by Redis
    assert_key_not_leaked(r, key)


async def test_a_used_up_quota_answers_429_with_retry_after(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    key = fresh_key("used-up")
    gateway = await metered_gateway(nursery, tmp_path, redis_url, key, requests=3, tokens=100_000)
    auth = {"authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            for i in range(3):
                r = await client.post(
                    gateway + "/v1/chat/completions", json=chat(max_tokens=4), headers=auth
                )
                assert r.status_code == 200, r.text
                assert r.headers["x-ratelimit-remaining-requests"] == str(2 - i)
                assert_key_not_leaked(r, key)
            r = await client.post(
                gateway + "/v1/chat/completions", json=chat(max_tokens=4), headers=auth
            )
            other = await client.post(
                gateway + "/v1/chat/completions", json=chat(max_tokens=4), headers=auth
            )
    error = assert_openai_error(r, 429)
    assert error["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["ratelimit"].startswith('"requests";r=0;')
    assert_key_not_leaked(r, key)
    assert other.status_code == 429  # refusing took nothing back: still over
    assert_key_not_leaked(other, key)


async def test_the_token_quota_refuses_an_estimate_it_cannot_hold(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    key = fresh_key("tokens")
    gateway = await metered_gateway(nursery, tmp_path, redis_url, key, requests=10, tokens=2000)
    auth = {"authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            big = await client.post(
                gateway + "/v1/chat/completions", json=chat(max_tokens=5000), headers=auth
            )
            small = await client.post(
                gateway + "/v1/chat/completions", json=chat(max_tokens=8), headers=auth
            )
    assert assert_openai_error(big, 429)["type"] == "tokens"
    assert "retry-after" in big.headers
    assert big.headers["x-ratelimit-limit-tokens"] == "2000"
    assert_key_not_leaked(big, key)
    # both quotas or neither: the refused request took no request either
    assert small.status_code == 200, small.text
    assert small.headers["x-ratelimit-remaining-requests"] == "9"
    assert small.headers["x-ratelimit-remaining-tokens"] == str(2000 - estimate(chat(max_tokens=8)))


async def test_reserved_tokens_are_settled_to_the_real_usage(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    # No max_tokens: the gateway reserves the prompt estimate plus its default (256), while the
    # demo backend writes its own default (64 tokens), a much shorter real answer.
    key = fresh_key("settle")
    gateway = await metered_gateway(nursery, tmp_path, redis_url, key, requests=100, tokens=5000)
    auth = {"authorization": f"Bearer {key}"}
    body = chat("a question with a short answer")
    reserved = estimate(body)
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            first = await client.post(gateway + "/v1/chat/completions", json=body, headers=auth)
            assert first.status_code == 200, first.text
            assert first.headers["x-ratelimit-remaining-tokens"] == str(5000 - reserved)
            used = first.json()["usage"]["total_tokens"]
            assert used < reserved - 100  # the test means something only if they differ
            await trio.sleep(0.3)  # the settlement runs in the background, after the response
            second = await client.post(gateway + "/v1/chat/completions", json=body, headers=auth)
    assert second.status_code == 200, second.text
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    # what the first request holds now is its real usage, not its reservation
    assert 5000 - reserved - remaining == used


async def test_a_streams_usage_settles_its_tokens_even_when_its_event_comes_in_pieces(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    """The usage event of a stream (`stream_options.include_usage`) arrives in several reads
    when the backend's writes are cut up (here each chunk in 4 pieces): it still settles the
    reservation to the real usage, not to a count of the events."""
    key = fresh_key("settle-stream")
    demo = await start_demo(nursery)
    proxy: FaultProxy = await nursery.start(serve_fault_proxy, demo)
    proxy.mode = Fault.drip(0.005, pieces=4)
    text = METERED.format(requests=100, tokens=5000, key=key)
    gateway = await start_gateway(nursery, settings_from(tmp_path, text, proxy.url, redis_url))
    auth = {"authorization": f"Bearer {key}"}
    body = chat("a question with a short answer", stream=True)
    body["stream_options"] = {"include_usage": True}
    reserved = estimate(body)
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(30):
            events = ""
            url = gateway + "/v1/chat/completions"
            async with client.stream("POST", url, json=body, headers=auth) as first:
                assert first.status_code == 200
                async for piece in first.aiter_text():
                    events += piece
            chunks = [json.loads(line[5:]) for line in events.splitlines() if line[:7] == "data: {"]
            used = [c["usage"] for c in chunks if c.get("usage")][-1]["total_tokens"]
            assert used < reserved - 100  # the test means something only if they differ
            await trio.sleep(0.3)  # the settlement runs in the background, after the response
            proxy.mode = Fault.PASS
            second = await client.post(url, json=chat("again"), headers=auth)
    assert second.status_code == 200, second.text
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    # what the first request holds now is its real usage (not its reservation, nor a count
    # of its events), and the second its reservation
    assert 5000 - estimate(chat("again")) - remaining == used


CACHED = """
[tiers.cached]
weight = 1
max_wait_s = 2.0
max_depth = 1
ladder = ["cache"]

[[keys]]
key = "{a}"
tenant = "tenant-a-{a}"
tier = "cached"
[[keys]]
key = "{b}"
tenant = "tenant-b-{b}"
tier = "cached"

[models.demo-small]
backends = ["demo"]

[controller]
initial_limit = 1
min_limit = 1
max_limit = 1
"""


async def demo_running(client: httpx2.AsyncClient, demo: str) -> float:
    text = (await client.get(demo + "/metrics")).text
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return float(line.split()[-1])
    return 0.0


def scope_prefix(scope: str) -> str:
    return f"cache:{hashlib.sha256(scope.encode()).hexdigest()[:16]}:*"


@dataclasses.dataclass
class CachedTier:
    gateway: str
    demo: str
    key_a: str
    key_b: str

    @property
    def url(self) -> str:
        return self.gateway + "/v1/chat/completions"

    def auth(self, key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    def scope(self, key: str) -> str:
        tenant = "tenant-a" if key == self.key_a else "tenant-b"
        return f"tenant:{tenant}-{key}"

    @contextlib.asynccontextmanager
    async def queue_full(self, client: httpx2.AsyncClient) -> AsyncIterator[None]:
        """A slow request in flight (window 1) and another queued (depth 1): the next request
        is shed with queue_full and walks the ladder."""

        async def post(body: dict[str, Any]) -> None:
            async with httpx2.AsyncClient(timeout=15) as own:
                await own.post(self.url, json=body, headers=self.auth(self.key_a))

        async with trio.open_nursery() as load:
            load.start_soon(post, chat("a long story", max_tokens=600))
            while await demo_running(client, self.demo) < 1:
                await trio.sleep(0.02)
            load.start_soon(post, chat("waits in the queue", max_tokens=4))
            await trio.sleep(0.3)  # the filler is queued now
            yield
            load.cancel_scope.cancel()  # their answers are not needed


@pytest.fixture
async def cached_tier(nursery: trio.Nursery, redis_url: str, tmp_path: Path) -> CachedTier:
    slow = GpuConfig(max_batch=4, decode_base_s=0.01, decode_per_seq_s=0.0)
    demo = await start_demo(nursery, slow)
    key_a, key_b = fresh_key("a"), fresh_key("b")
    settings = settings_from(tmp_path, CACHED.format(a=key_a, b=key_b), demo, redis_url)
    return CachedTier(await start_gateway(nursery, settings), demo, key_a, key_b)


async def cache_first_answer(
    tier: CachedTier, client: httpx2.AsyncClient, redis: coredis.Redis[bytes], body: dict[str, Any]
) -> httpx2.Response:
    """Tenant A asks `body` while the service is idle; wait until its answer is cached."""
    first = await client.post(tier.url, json=body, headers=tier.auth(tier.key_a))
    assert first.status_code == 200, first.text
    assert "x-scheduler-cache" not in first.headers
    key = ResponseCache(redis, prefix="sched:cache").key(
        tier.scope(tier.key_a), PATHS["chat"], body
    )
    while not await redis.exists([key]):
        await trio.sleep(0.02)
    return first


async def test_a_shed_request_is_served_only_its_own_tenants_cache(
    cached_tier: CachedTier, redis_url: str
) -> None:
    tier = cached_tier
    question = chat("what is the capital of France?", max_tokens=6)
    async with (
        coredis.Redis.from_url(redis_url) as redis,
        httpx2.AsyncClient(timeout=10) as client,
    ):
        with trio.fail_after(30):
            first = await cache_first_answer(tier, client, redis, question)
            async with tier.queue_full(client):
                smuggled = {**question, "cache_key": "shared", "salt": "tenant-a"}
                b_shed = await client.post(tier.url, json=smuggled, headers=tier.auth(tier.key_b))
                salted = {**question, "cache_key": "other", "salt": "x", "user": "someone"}
                a_salted = await client.post(tier.url, json=salted, headers=tier.auth(tier.key_a))
            b_entries = [
                k async for k in redis.scan_iter(match=scope_prefix(tier.scope(tier.key_b)))
            ]

    # tenant B's shed request found nothing of its own: a 503, never tenant A's answer
    assert_openai_error(b_shed, 503)
    assert b_shed.headers["x-scheduler-shed"] == "queue_full"
    assert "x-scheduler-cache" not in b_shed.headers
    assert "retry-after" in b_shed.headers
    assert first.json()["choices"][0]["message"]["content"] not in b_shed.text
    assert b_entries == []
    # tenant A's, with a cache key, a salt and a user of its choosing, is the same entry
    assert a_salted.status_code == 200, a_salted.text
    assert a_salted.headers["x-scheduler-shed"] == "queue_full"
    assert a_salted.headers["x-scheduler-cache"] == "fresh"
    assert a_salted.content == first.content
    assert "age" in a_salted.headers
    for response in (first, b_shed, a_salted):
        assert_key_not_leaked(response, tier.key_a)
        assert_key_not_leaked(response, tier.key_b)


async def test_a_shed_stream_is_served_the_cached_answer_as_events(
    cached_tier: CachedTier, redis_url: str
) -> None:
    tier = cached_tier
    question = chat("name three colours", max_tokens=6)
    async with (
        coredis.Redis.from_url(redis_url) as redis,
        httpx2.AsyncClient(timeout=10) as client,
    ):
        with trio.fail_after(30):
            first = await cache_first_answer(tier, client, redis, question)
            async with tier.queue_full(client):
                stream = {**question, "stream": True}
                try:
                    streamed = await client.post(
                        tier.url, json=stream, headers=tier.auth(tier.key_a)
                    )
                except httpx2.RemoteProtocolError as exc:  # the body broke off after the 200
                    raise AssertionError(f"the cached stream broke off: {exc}") from exc
    assert streamed.status_code == 200, streamed.text
    assert streamed.headers["x-scheduler-cache"] == "fresh"
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == first.json()["choices"][0]["message"]["content"]


async def test_a_streamed_answer_is_cached_and_served_whole_when_shed(
    cached_tier: CachedTier, redis_url: str
) -> None:
    tier = cached_tier
    question = chat("name three rivers", max_tokens=6)
    async with (
        coredis.Redis.from_url(redis_url) as redis,
        httpx2.AsyncClient(timeout=10) as client,
    ):
        with trio.fail_after(30):
            first = await cache_first_answer(tier, client, redis, {**question, "stream": True})
            async with tier.queue_full(client):
                whole = await client.post(tier.url, json=question, headers=tier.auth(tier.key_a))
    events = [line[6:] for line in first.text.splitlines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    streamed = "".join(c["delta"].get("content") or "" for k in chunks for c in k["choices"])
    assert whole.status_code == 200, whole.text
    assert whole.headers["x-scheduler-cache"] == "fresh"
    completion = ChatCompletion.model_validate(whole.json())
    assert completion.choices[0].message.content == streamed != ""


def test_a_full_map_of_spent_keys_is_pruned_in_passes_not_per_insertion() -> None:
    """The fail-open limiter's memory of used-up keys is bounded; pruning keeps the live
    entries, or the newer half of them when nearly all are live, so that the next pass is
    many insertions away."""
    entries = {f"k{i}": float(i) for i in range(100)}
    assert list(_pruned(entries, lambda t: t >= 50)) == [f"k{i}" for i in range(50, 100)]
    assert list(_pruned(entries, lambda t: t >= 5)) == [f"k{i}" for i in range(52, 100)]


async def test_the_fail_open_limiter_settles_like_redis() -> None:
    """With Redis out the local limiter decides; its token reservation is settled to the real
    usage, and a call the backends failed gives back the request and every token."""
    guard = QuotaGuard(None, ScopedBreakers(), replicas=1, timeout=AdaptiveTimeout(0.1))
    quotas = QuotaSettings(algorithm="sliding_log", requests=2, tokens=100)

    async def take(cost: int) -> Verdict:
        return await guard.check("k", quotas, FailMode.OPEN, token_cost=cost, now=0.0)

    def hold(verdict: Verdict, reserved: int) -> QuotaHold:
        held = guard.hold("k", quotas, verdict, reserved=reserved)
        assert held is not None
        return held

    first = await take(80)
    assert first.source is Source.LOCAL and first.allowed
    refused = await take(80)
    assert not refused.allowed  # 160 > 100 tokens
    assert guard.hold("k", quotas, refused, reserved=80) is None
    first_hold = hold(first, 80)
    first_hold.settle(used=30, failed=False, now=0.0)
    first_hold.settle(used=0, failed=True, now=0.0)  # a hold ends once: this does nothing
    second = await take(60)  # 30 + 60 <= 100
    assert second.allowed and second.requests is not None and second.requests.remaining == 0
    hold(second, 60).settle(used=0, failed=True, now=0.0)
    third = await take(70)  # the failed call's request and 60 tokens came back
    assert third.allowed and third.tokens is not None and third.tokens.remaining == 0


# --- what a request abandoned by its client is charged ------------------------------------------

ABANDONED = """
[tiers.metered]
weight = 1
max_wait_s = 30
max_depth = 100
[tiers.metered.quota]
algorithm = "sliding_log"
period_s = 3600
requests = 5
tokens = 100000

[[keys]]
key = "{key}"
tenant = "t-{key}"
tier = "metered"

[models.demo-small]
backends = ["demo"]

[controller]
initial_limit = 1
min_limit = 1
max_limit = 1
"""
SLOW_GPU = GpuConfig(max_batch=4, decode_base_s=0.01, decode_per_seq_s=0.0)  # 10 ms a token
LONG = 400  # max_tokens of a long answer: 4 s of decoding


@dataclasses.dataclass
class Abandoning:
    """A gateway whose one key has 5 requests an hour, in front of a slow demo backend that
    serves one request at a time, and the means to read what Redis holds for that key."""

    gateway: str
    demo: str
    key: str
    settings: Settings

    @property
    def url(self) -> str:
        return self.gateway + "/v1/chat/completions"

    async def held(self) -> tuple[int, int]:
        """The (requests, tokens) Redis holds for the key: its own count, not a header."""
        requests, tokens = self.settings.tier("metered").quotas.specs()
        assert requests is not None and tokens is not None
        kid = key_id(self.key, self.settings.key_secret)
        assert self.settings.redis_url is not None
        async with coredis.Redis.from_url(self.settings.redis_url) as redis:
            store = RedisQuotaStore(redis, prefix=f"{self.settings.redis_prefix}:quota")
            states = [
                await store.state(kid, slot="requests", spec=requests),
                await store.state(kid, slot="tokens", spec=tokens),
            ]
        held = []
        for state in states:
            assert state is None or isinstance(state, tuple), state  # a sliding log
            held.append(sum(entry.cost for entry in state or ()))
        return held[0], held[1]

    async def held_once_settled(self, requests: int) -> tuple[int, int]:
        """What Redis holds once the background settlements landed (`requests` units)."""
        with trio.move_on_after(3):
            while (await self.held())[0] != requests:
                await trio.sleep(0.05)
        await trio.sleep(0.3)  # a token settlement runs next to the request's
        return await self.held()

    async def wait_running(self, client: httpx2.AsyncClient, count: int) -> None:
        while await demo_running(client, self.demo) < count:
            await trio.sleep(0.02)

    async def abandon_whole(self, client: httpx2.AsyncClient, body: dict[str, Any]) -> None:
        """Send `body` and close the connection once the backend is working on it."""

        async def post() -> None:
            async with httpx2.AsyncClient(timeout=30) as own:
                await own.post(self.url, json=body, headers=self.auth)

        async with trio.open_nursery() as n:
            n.start_soon(post)
            await self.wait_running(client, 1)
            await trio.sleep(0.3)
            n.cancel_scope.cancel()  # the client goes away mid-flight

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}


@pytest.fixture
async def abandoning(nursery: trio.Nursery, redis_url: str, tmp_path: Path) -> Abandoning:
    demo = await start_demo(nursery, SLOW_GPU)
    key = fresh_key("abandon")
    settings = settings_from(tmp_path, ABANDONED.format(key=key), demo, redis_url)
    return Abandoning(await start_gateway(nursery, settings), demo, key, settings)


async def test_a_request_abandoned_mid_flight_is_charged_its_reservation(
    abandoning: Abandoning,
) -> None:
    # issue 11: 15 requests abandoned after 0.6 s each were all refunded (the key kept 4 of 5)
    body = chat("a long story", max_tokens=LONG)
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(30):
            for _ in range(2):
                await abandoning.abandon_whole(client, body)
            held = await abandoning.held_once_settled(requests=2)
    # both requests and, their answers never read, both reservations
    assert held == (2, 2 * estimate(body)), held


async def test_a_stream_abandoned_mid_flight_is_charged_what_it_produced(
    abandoning: Abandoning,
) -> None:
    body = chat("a long story", max_tokens=LONG, stream=True)
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(30):
            async with client.stream(
                "POST", abandoning.url, json=body, headers=abandoning.auth
            ) as r:
                assert r.status_code == 200
                chunks = 0
                async for _ in r.aiter_raw():
                    chunks += 1
                    if chunks >= 20:
                        break  # the client goes away, leaving the stream unread
            held = await abandoning.held_once_settled(requests=1)
    requests, tokens = held
    assert requests == 1, held
    # the prompt and what was generated until the client left: more than nothing, far less
    # than the reservation (a 400-token answer cut after ~20 events)
    prompt = estimate(body) - LONG
    assert prompt < tokens < prompt + LONG // 2, held


async def test_a_request_abandoned_while_queued_is_given_back(abandoning: Abandoning) -> None:
    long_body, queued_body = chat("a long story", max_tokens=LONG), chat("queued", max_tokens=8)

    async def post(body: dict[str, Any]) -> None:
        async with httpx2.AsyncClient(timeout=30) as own:
            await own.post(abandoning.url, json=body, headers=abandoning.auth)

    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(post, long_body)  # holds the gate's one seat
                await abandoning.wait_running(client, 1)
                async with trio.open_nursery() as queued:
                    queued.start_soon(post, queued_body)
                    with trio.move_on_after(3):  # admitted and counted, then queued
                        while (await abandoning.held())[0] < 2:
                            await trio.sleep(0.02)
                    assert (await abandoning.held())[0] == 2
                    await trio.sleep(0.2)
                    queued.cancel_scope.cancel()  # the client goes away while queued
                held = await abandoning.held_once_settled(requests=1)
                n.cancel_scope.cancel()
    # the queued request never reached a backend: its unit and reservation are back
    assert held == (1, estimate(long_body)), held
