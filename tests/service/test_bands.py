"""Priority bands through real sockets: with Free flooding the demo backend at twice its
capacity, Enterprise in a band of its own keeps close to its idle latency while Free is shed
on arrival; with weights alone the same load makes Enterprise wait behind Free's calls in the
backend's batch."""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from pathlib import Path

import httpx2
import trio

from scheduler.models.gpu import GpuConfig
from scheduler.service.config import load_settings
from scheduler.service.serve import with_demo_url
from tests.conftest import start_demo, start_gateway

PROTECT_S = 0.25  # under twice Enterprise's idle latency here (~0.15 s): p95 lands above it
BANDS = f"""
[tiers.enterprise]
weight = 8
max_wait_s = 10
priority = 1
protect_latency_s = {PROTECT_S}
"""
WEIGHTS = """
[tiers.enterprise]
weight = 8
max_wait_s = 10
"""
COMMON = """
[tiers.free]
weight = 1
max_wait_s = 1.0
max_depth = 1000
fail_fast = true

[[keys]]
key = "k-enterprise"
tenant = "e"
tier = "enterprise"
[[keys]]
key = "k-free"
tenant = "f"
tier = "free"

[controller]
initial_limit = 8
max_limit = 16
target_latency_s = 1.0
tick_s = 0.1
cooldown_s = 0.3
"""


class Run:
    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = {"enterprise": [], "free": []}
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.shed_after: list[float] = []


async def drive(gateway: str, *, seconds: float, free_rps: float, enterprise_rps: float) -> Run:
    run = Run()

    async def one(client: httpx2.AsyncClient, tier: str, i: int) -> None:
        body = {  # distinct prompts: no cached answer stands in for a shed request
            "model": "demo-small",
            "messages": [{"role": "user", "content": f"{tier} {i}"}],
            "max_tokens": 10,
        }
        started = trio.current_time()
        r = await client.post(
            gateway + "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer k-{tier}"},
        )
        elapsed = trio.current_time() - started
        if r.status_code == 200:
            run.latencies[tier].append(elapsed)
            run.outcomes[tier, "200"] += 1
        else:
            reason = r.headers.get("x-scheduler-shed", str(r.status_code))
            run.outcomes[tier, reason] += 1
            if reason == "predicted_wait":
                run.shed_after.append(elapsed)

    async def arrivals(client: httpx2.AsyncClient, tier: str, rps: float) -> None:
        async with trio.open_nursery() as calls:
            for i in range(int(seconds * rps)):
                calls.start_soon(one, client, tier, i)
                await trio.sleep(1 / rps)

    limits = httpx2.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx2.AsyncClient(timeout=30, limits=limits) as client, trio.open_nursery() as load:
        if enterprise_rps:
            load.start_soon(arrivals, client, "enterprise", enterprise_rps)
        if free_rps:
            load.start_soon(arrivals, client, "free", free_rps)
    return run


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


async def start(nursery: trio.Nursery, redis_url: str, path: Path, demo: str, tiers: str) -> str:
    path.write_text(tiers + COMMON)
    settings = load_settings(path, env={}, overrides={"port": 0})
    settings = dataclasses.replace(with_demo_url(settings, demo), redis_url=redis_url)
    return await start_gateway(nursery, settings)


async def test_enterprise_keeps_its_latency_while_free_is_shed_on_arrival(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    # 8 at once x 10 tokens at 10-26 ms a step: about 30 requests/s of capacity
    gpu = GpuConfig(max_batch=8, max_waiting=64, decode_base_s=0.01, decode_per_seq_s=0.002)
    demo = await start_demo(nursery, gpu)
    banded = await start(nursery, redis_url, tmp_path / "bands.toml", demo, BANDS)
    weighted = await start(nursery, redis_url, tmp_path / "weights.toml", demo, WEIGHTS)
    with trio.fail_after(25):
        idle = await drive(banded, seconds=2.0, free_rps=0, enterprise_rps=10)
        bands = await drive(banded, seconds=4.0, free_rps=60, enterprise_rps=8)
        await trio.sleep(0.5)
        weights = await drive(weighted, seconds=4.0, free_rps=60, enterprise_rps=8)

    idle_p95 = p95(idle.latencies["enterprise"])
    for name, run in (("bands", bands), ("weights", weights)):
        print(  # the README's figures
            f"{name}: enterprise p50 {statistics.median(run.latencies['enterprise']):.3f} s "
            f"p95 {p95(run.latencies['enterprise']):.3f} s (idle p95 {idle_p95:.3f} s); "
            f"outcomes {dict(run.outcomes)}; free shed on arrival answered after p50 "
            f"{statistics.median(run.shed_after or [0]):.3f} s"
        )
    served = bands.outcomes["enterprise", "200"]
    assert served == 32, bands.outcomes  # every Enterprise request answered by the backend
    # 1.7-2.3x its idle p95 in five runs on a quiet machine, 2.7-2.8x and 0.71x weights' with
    # the whole suite running beside it (a shared machine moves the idle figure most)
    assert p95(bands.latencies["enterprise"]) <= 3 * idle_p95, bands.latencies
    assert p95(bands.latencies["enterprise"]) < 0.8 * p95(weights.latencies["enterprise"])
    # Free is degraded at arrival: most of its flood shed at once, a 503 in milliseconds
    assert bands.outcomes["free", "predicted_wait"] >= 60, bands.outcomes
    assert statistics.median(bands.shed_after) < 0.05, bands.shed_after
    assert bands.outcomes["free", "200"] > 0  # held back, not starved
