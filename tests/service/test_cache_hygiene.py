"""The response cache keeps only whole answers, and a shed request goes on down its ladder
when a cached entry cannot serve it."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import coredis
import httpx2
import trio

from backends.demo.server import DemoConfig, serve_demo_backend
from backends.redis.cache import ResponseCache
from scheduler.models.gpu import GpuConfig
from tests.conftest import start_demo, start_gateway
from tests.service.test_quota_path import chat, demo_running, settings_from
from tests.support.fault_proxy import Fault, serve_fault_proxy

CONFIG = """
[redis]
prefix = "{prefix}"
[tiers.t]
weight = 1
max_wait_s = 0.3
max_depth = 10
ladder = ["cache", "fallback"]
[[keys]]
key = "{key}"
tenant = "{tenant}"
tier = "t"
[models.demo-small]
backends = ["{backend}"]
fallback = "demo-tiny"
[models.demo-tiny]
backends = ["demo"]
[controller]
initial_limit = 1
min_limit = 1
max_limit = 1
"""
CHAT = "/v1/chat/completions"


def config(backend: str, key: str) -> tuple[str, str, str]:
    prefix, tenant = f"hygiene-{uuid.uuid4().hex}", f"tenant-{uuid.uuid4().hex}"
    text = CONFIG.format(prefix=prefix, key=key, tenant=tenant, backend=backend)
    return text, prefix, tenant


async def test_only_well_formed_answers_are_cached(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    demo = await start_demo(nursery)
    proxy = await nursery.start(serve_fault_proxy, demo)
    key = f"sk-{uuid.uuid4().hex}"
    text, prefix, tenant = config(proxy.url, key)
    gateway = await start_gateway(nursery, settings_from(tmp_path, text, demo, redis_url))
    auth = {"authorization": f"Bearer {key}"}
    html, good = chat("answered by a misrouted proxy"), chat("answered by the model")
    async with (
        httpx2.AsyncClient(timeout=10) as client,
        coredis.Redis.from_url(redis_url) as redis,
    ):
        cache = ResponseCache(redis, prefix=f"{prefix}:cache")
        with trio.fail_after(20):
            proxy.mode = Fault.HTML_200
            r = await client.post(gateway + CHAT, json=html, headers=auth)
            assert r.status_code == 200 and r.text.startswith("<html>")
            proxy.mode = Fault.PASS
            r = await client.post(gateway + CHAT, json=good, headers=auth)
            assert r.status_code == 200, r.text
            while not await redis.exists([cache.key(f"tenant:{tenant}", CHAT, good)]):
                await trio.sleep(0.02)  # the good answer's write, queued after the HTML one's
        assert not await redis.exists([cache.key(f"tenant:{tenant}", CHAT, html)])


async def test_an_entry_that_cannot_be_streamed_goes_on_to_the_fallback(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    slow = GpuConfig(max_batch=4, decode_base_s=0.01, decode_per_seq_s=0.0)
    models = ("demo-small", "demo-tiny")
    port = await nursery.start(serve_demo_backend, DemoConfig(gpu=slow, model_names=models))
    demo = f"http://127.0.0.1:{port}"
    key = f"sk-{uuid.uuid4().hex}"
    text, prefix, tenant = config("demo", key)
    gateway = await start_gateway(nursery, settings_from(tmp_path, text, demo, redis_url))
    auth = {"authorization": f"Bearer {key}"}
    body = chat("streamed when shed", max_tokens=4)
    async with (
        httpx2.AsyncClient(timeout=15) as client,
        coredis.Redis.from_url(redis_url) as redis,
    ):
        cache = ResponseCache(redis, prefix=f"{prefix}:cache")
        # an entry (from an older version, say) that is no completion to replay as events
        await cache.put(
            f"tenant:{tenant}",
            CHAT,
            body,
            b'{"choices": 3}',
            now_unix=time.time(),
            fresh_s=60,
            stale_s=60,
        )
        with trio.fail_after(20):
            async with trio.open_nursery() as load:

                async def long_call() -> None:
                    await client.post(
                        gateway + CHAT, json=chat("long", max_tokens=600), headers=auth
                    )

                load.start_soon(long_call)  # holds the window of 1
                while await demo_running(client, demo) < 1:
                    await trio.sleep(0.02)
                r = await client.post(gateway + CHAT, json={**body, "stream": True}, headers=auth)
                load.cancel_scope.cancel()
    assert r.status_code == 200, r.text
    assert r.headers["x-scheduler-shed"] == "deadline"
    assert r.headers["x-scheduler-degraded"] == "fallback:demo-tiny"
    assert r.text.rstrip().endswith("data: [DONE]")


async def test_a_hot_prompt_is_written_once_per_tenth_of_its_freshness(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    """The same request bytes answered again within a tenth of `cache_fresh_s` are not written
    again (the entry is still fresh); after that they are, and other bytes always are."""
    demo = await start_demo(nursery)
    key = f"sk-{uuid.uuid4().hex}"
    text, prefix, tenant = config("demo", key)
    text = text.replace('fallback = "demo-tiny"', 'fallback = "demo-tiny"\ncache_fresh_s = 10')
    gateway = await start_gateway(nursery, settings_from(tmp_path, text, demo, redis_url))
    auth = {"authorization": f"Bearer {key}"}
    hot, other = chat("hot prompt"), chat("another prompt")
    async with (
        httpx2.AsyncClient(timeout=10) as client,
        coredis.Redis.from_url(redis_url) as redis,
    ):
        cache = ResponseCache(redis, prefix=f"{prefix}:cache")

        async def answered_then_entry(body: dict[str, object]) -> bytes | None:
            r = await client.post(gateway + CHAT, json=body, headers=auth)
            assert r.status_code == 200, r.text
            return await redis.get(cache.key(f"tenant:{tenant}", CHAT, body))

        async def written(body: dict[str, object], unlike: bytes | None) -> bytes:
            """The entry for `body`, once one other than `unlike` is there."""
            entry_key = cache.key(f"tenant:{tenant}", CHAT, body)
            while (entry := await redis.get(entry_key)) in (None, unlike):
                await trio.sleep(0.01)
            assert entry is not None
            return entry

        with trio.fail_after(20):
            await answered_then_entry(hot)
            first = await written(hot, None)
            started = trio.current_time()
            for _ in range(3):  # each answer has an id of its own: a write would show
                assert await answered_then_entry(hot) == first
            await answered_then_entry(other)
            await written(other, None)
            assert await redis.get(cache.key(f"tenant:{tenant}", CHAT, hot)) == first
            assert trio.current_time() - started < 1.0, "too slow to say: the window is 1 s"
            await trio.sleep_until(started + 1.0)
            await answered_then_entry(hot)
            await written(hot, first)  # written again, a tenth of 10 s later


async def test_nothing_is_cached_when_no_ladder_reads_the_cache(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    demo = await start_demo(nursery)
    body = chat("read by nobody")
    entries = []
    for ladder in ('["fallback"]', '["cache", "fallback"]'):
        key = f"sk-{uuid.uuid4().hex}"
        text, prefix, tenant = config("demo", key)
        text = text.replace('ladder = ["cache", "fallback"]', f"ladder = {ladder}")
        gateway = await start_gateway(nursery, settings_from(tmp_path, text, demo, redis_url))
        async with httpx2.AsyncClient(timeout=10) as client:
            r = await client.post(
                gateway + CHAT, json=body, headers={"authorization": f"Bearer {key}"}
            )
            assert r.status_code == 200, r.text
        entries.append(f"{prefix}:cache")
        entries[-1] = ResponseCache(None, prefix=entries[-1]).key(f"tenant:{tenant}", CHAT, body)  # type: ignore[arg-type]
    async with coredis.Redis.from_url(redis_url) as redis:
        with trio.fail_after(10):  # the second gateway's write lands, the first's was sent first
            while not await redis.exists([entries[1]]):
                await trio.sleep(0.01)
        assert not await redis.exists([entries[0]])
