"""Overload through real sockets: Enterprise goes first, Free is shed first, nothing hangs."""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from pathlib import Path

import httpx2
import trio

from scheduler.models.gpu import GpuConfig
from scheduler.service.config import load_settings
from scheduler.service.serve import with_demo_url
from tests.conftest import start_demo, start_gateway

CONFIG = """
[tiers.enterprise]
weight = 8
max_wait_s = 3.0
max_depth = 200
[tiers.pro]
weight = 3
max_wait_s = 1.5
max_depth = 100
[tiers.free]
weight = 1
max_wait_s = 0.75
max_depth = 50
shed_on_overload = true

[[keys]]
key = "k-enterprise"
tenant = "e"
tier = "enterprise"
[[keys]]
key = "k-pro"
tenant = "p"
tier = "pro"
[[keys]]
key = "k-free"
tenant = "f"
tier = "free"

[controller]
initial_limit = 4
max_limit = 8
target_latency_s = 0.6
tick_s = 0.1
cooldown_s = 0.3
"""
MAX_WAIT_S = {"enterprise": 3.0, "pro": 1.5, "free": 0.75}


async def test_overload_sheds_free_first_and_answers_everyone(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    # about 4 at once x 10 tokens at ~12 ms a step: roughly 30 requests/s of capacity
    gpu = GpuConfig(max_batch=4, max_waiting=64, decode_base_s=0.01, decode_per_seq_s=0.0005)
    demo = await start_demo(nursery, gpu)
    path = tmp_path / "overload.toml"
    path.write_text(CONFIG)
    settings = load_settings(path, env={}, overrides={"port": 0})
    settings = dataclasses.replace(with_demo_url(settings, demo), redis_url=redis_url)
    gateway = await start_gateway(nursery, settings)

    results: dict[str, Counter[int]] = defaultdict(Counter)
    late: list[tuple[str, float]] = []
    missing_retry_after: list[int] = []
    tiers = ["enterprise", "pro", "free"]

    async def one(client: httpx2.AsyncClient, tier: str, i: int) -> None:
        # distinct prompts: no cached answer can stand in for a shed request here
        body = {
            "model": "demo-small",
            "messages": [{"role": "user", "content": f"q{i}"}],
            "max_tokens": 10,
        }
        started = trio.current_time()
        r = await client.post(
            gateway + "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer k-{tier}"},
        )
        elapsed = trio.current_time() - started
        results[tier][r.status_code] += 1
        if r.status_code in (429, 503) and "retry-after" not in r.headers:
            missing_retry_after.append(r.status_code)
        if elapsed > MAX_WAIT_S[tier] + 2.0:  # its deadline, one service time and a margin
            late.append((tier, elapsed))

    limits = httpx2.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx2.AsyncClient(timeout=30, limits=limits) as client:
        with trio.fail_after(30):
            async with trio.open_nursery() as load:
                # open-model arrivals: 120 requests/s, about four times the capacity, for 3 s
                for i in range(360):
                    load.start_soon(one, client, tiers[i % 3], i)
                    await trio.sleep(1 / 120)

    ok = {t: results[t][200] / sum(results[t].values()) for t in tiers}
    assert set().union(*(set(c) for c in results.values())) <= {200, 503}, dict(results)
    assert missing_retry_after == []
    assert late == []
    assert ok["enterprise"] > 0.9, dict(results)
    assert ok["enterprise"] > ok["pro"] > ok["free"], ok
    assert results["free"][503] > results["enterprise"][503]
