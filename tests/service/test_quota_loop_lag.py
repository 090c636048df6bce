"""A gateway whose own event loop is saturated answers slower, not with 503 "quota could not
be checked": its loop's lag is not a slow Redis (issue 11, item 25).

One process, one trio loop: the real gateway, the in-process demo backend, a real
redis-server (the session's), real loopback HTTP clients, and a task that hogs the CPU,
blocking the loop in chunks of tens of ms, longer than the Redis timeout (20 ms here). Redis
itself answers in a millisecond all along. Every request goes through the quota script, on a
tier that fails closed (503 when Redis is taken for failing) and one that fails open (503
when Redis is taken for slow).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx2
import trio

from scheduler.service.config import load_settings
from scheduler.service.serve import with_demo_url
from tests.conftest import start_demo, start_gateway

CONFIG = """
[redis]
timeout_s = 0.02
[tiers.open]
weight = 1
max_wait_s = 30
max_depth = 1000
fail_mode = "open"
[tiers.open.quota]
algorithm = "sliding_log"
period_s = 60
requests = 100000
[tiers.closed]
weight = 1
max_wait_s = 30
max_depth = 1000
fail_mode = "closed"
[tiers.closed.quota]
algorithm = "gcra"
period_s = 60
requests = 100000

[[keys]]
key = "{open}"
tenant = "open-tenant"
tier = "open"
[[keys]]
key = "{closed}"
tenant = "closed-tenant"
tier = "closed"

[models.demo-small]
backends = ["demo"]
"""
CHAT = {"model": "demo-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
CLIENTS_PER_TIER = 8
HOG_CHUNK_S = 0.05  # the loop is blocked this long at a time: over twice the Redis timeout
HOG_GAP_S = 0.02  # and then free this long
LOAD_S = 4.0
REQUEST_TIMEOUT_S = 20.0


async def hog_cpu(until_at: float) -> int:
    """Block the event loop in chunks of HOG_CHUNK_S (a CPU-bound stretch of this process,
    as under saturation or a collector pause) until `until_at`; the number of chunks."""
    chunks = 0
    while trio.current_time() < until_at:
        spin_until = time.perf_counter() + HOG_CHUNK_S
        while time.perf_counter() < spin_until:
            pass
        chunks += 1
        await trio.sleep(HOG_GAP_S)
    return chunks


async def client_loop(
    client: httpx2.AsyncClient, url: str, key: str, until_at: float, statuses: Counter[str]
) -> None:
    auth = {"authorization": f"Bearer {key}"}
    while trio.current_time() < until_at:
        with trio.fail_after(REQUEST_TIMEOUT_S):
            r = await client.post(url, json=CHAT, headers=auth)
        detail = r.json()["error"]["message"] if r.status_code != 200 else ""
        statuses[f"{r.status_code} {detail}".strip()] += 1


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_a_saturated_loop_is_not_taken_for_a_slow_redis(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str
) -> None:
    keys = {"open": f"sk-open-{uuid.uuid4().hex}", "closed": f"sk-closed-{uuid.uuid4().hex}"}
    path = tmp_path / "lag.toml"
    path.write_text(CONFIG.format(**keys))
    demo = await start_demo(nursery)
    settings = load_settings(path, env={}, overrides={"port": 0})
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    settings = with_demo_url(settings, demo)
    settings = dataclasses.replace(settings, redis_url=redis_url, redis_prefix=prefix)
    gateway = await start_gateway(nursery, settings)
    url = gateway + "/v1/chat/completions"
    statuses: dict[str, Counter[str]] = {tier: Counter() for tier in keys}
    with trio.fail_after(LOAD_S + 2 * REQUEST_TIMEOUT_S):
        async with httpx2.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            for key in keys.values():  # Redis decides, before the loop is loaded
                r = await client.post(url, json=CHAT, headers={"authorization": f"Bearer {key}"})
                assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "100000"
            until_at = trio.current_time() + LOAD_S
            chunks = 0

            async def hog() -> None:
                nonlocal chunks
                chunks = await hog_cpu(until_at)

            async with trio.open_nursery() as load:
                load.start_soon(hog)
                for tier, key in keys.items():
                    for _ in range(CLIENTS_PER_TIER):
                        load.start_soon(client_loop, client, url, key, until_at, statuses[tier])
            await trio.sleep(0.3)  # a dispatcher tick: the metrics are exported
            text = (await client.get(gateway + "/metrics")).text
    # the loop really was blocked, most of the time, in chunks over the Redis timeout
    assert chunks >= LOAD_S / (HOG_CHUNK_S + HOG_GAP_S) / 2, chunks
    for tier, counts in statuses.items():
        assert set(counts) == {"200"}, (tier, dict(counts))
        assert counts["200"] >= 10, (tier, dict(counts))
    assert metric(text, "scheduler_redis_errors_total") == 0
