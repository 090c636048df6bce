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
