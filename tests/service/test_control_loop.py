"""The closed control loop, live: the controller follows the demo backend's capacity, by
latency and by pressure alone; SIGHUP reloads the gains from the config file."""

from __future__ import annotations

import dataclasses
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import httpx2
import trio

from scheduler.models.gpu import GpuConfig
from scheduler.service.config import load_settings
from scheduler.service.serve import with_demo_url
from tests.conftest import start_demo, start_gateway

TOKEN = "loop-admin"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
CONFIG = """
[redis]
prefix = "{prefix}"
[tiers.enterprise]
weight = 8
max_wait_s = 10
max_depth = 1000
slo_s = 10
[tiers.free]
weight = 1
max_wait_s = 2
max_depth = 200
shed_on_overload = true
[[keys]]
key = "k-enterprise"
tenant = "e"
tier = "enterprise"
[[keys]]
key = "k-free"
tenant = "f"
tier = "free"
[models.demo-small]
backends = ["demo"]
[models.demo-small.pressure]
interval_s = 0.25
stale_after_s = 2.0
[controller]
initial_limit = 8
min_limit = 1
max_limit = 32
increase_step = 1
decrease_factor = 0.7
cooldown_s = 1.0
tick_s = 0.25
target_latency_s = {target}
pressure_threshold = 0.8
"""


async def start(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path, gpu: GpuConfig, target: float
) -> tuple[str, str, Path]:
    demo = await start_demo(nursery, gpu)
    path = tmp_path / "loop.toml"
    prefix = f"loop-{uuid.uuid4().hex}"  # its gains stay its own in the shared Redis
    path.write_text(CONFIG.replace("{target}", str(target)).replace("{prefix}", prefix))
    settings = load_settings(path, env={"SCHEDULER_ADMIN_TOKEN": TOKEN}, overrides={"port": 0})
    settings = dataclasses.replace(with_demo_url(settings, demo), redis_url=redis_url)
    return demo, await start_gateway(nursery, settings), path


async def run_phases(
    gateway: str, demo: str, phases: list[tuple[float, dict[str, Any]]], rate: float
) -> tuple[list[tuple[float, float]], list[float], list[float]]:
    """Open-model load (Enterprise and Free alternating) while the demo's config changes at
    each phase; returns the controller's limit over time and Enterprise/Free latencies."""
    limits: list[tuple[float, float]] = []
    enterprise: list[float] = []
    body = {"model": "demo-small", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20}
    limits_ok = httpx2.Limits(max_connections=500, max_keepalive_connections=500)
    async with httpx2.AsyncClient(timeout=30, limits=limits_ok) as client:
        start = trio.current_time()

        async def one(i: int) -> None:
            tier = "enterprise" if i % 2 else "free"
            sent = trio.current_time()
            msg = {**body, "messages": [{"role": "user", "content": f"m{i}"}]}
            r = await client.post(
                gateway + "/v1/chat/completions",
                json=msg,
                headers={"authorization": f"Bearer k-{tier}"},
            )
            if tier == "enterprise":
                assert r.status_code == 200, r.text
                enterprise.append(trio.current_time() - sent)
            else:
                assert r.status_code in (200, 503)

        async def watch() -> None:
            while True:
                state = (await client.get(gateway + "/admin/v1/controller", headers=ADMIN)).json()
                assert isinstance(state["inflight"], int) and state["inflight"] >= 0, state
                limits.append((trio.current_time() - start, state["limit"]))
                await trio.sleep(0.25)

        async with trio.open_nursery() as load:
            load.start_soon(watch)
            i = 0
            for duration, change in phases:
                if change:
                    r = await client.post(demo + "/demo/config", json=change)
                    assert r.status_code == 200, r.text
                phase_end = trio.current_time() + duration
                while trio.current_time() < phase_end:
                    load.start_soon(one, i)
                    i += 1
                    await trio.sleep(1 / rate)
            await trio.sleep(1.0)
            load.cancel_scope.cancel()
    return limits, enterprise, []


def window(limits: list[tuple[float, float]], start: float, end: float) -> list[float]:
    return [limit for at, limit in limits if start <= at < end]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.99 * (len(ordered) - 1))]


async def test_the_limit_follows_capacity_by_latency(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    # per token 5 ms + 2 ms per running sequence: at the 0.6 s target the window settles near 13;
    # then each token costs 20 ms more, so the target allows about 5 (a 4x slower engine, which
    # the controller can only see in the latency: the KV cache never fills)
    gpu = GpuConfig(max_batch=8, decode_base_s=0.005, decode_per_seq_s=0.002, max_waiting=500)
    demo, gateway, _ = await start(nursery, redis_url, tmp_path, gpu, target=0.6)
    with trio.fail_after(60):
        limits, enterprise, _ = await run_phases(
            gateway,
            demo,
            [(8, {}), (10, {"decode_base_s": 0.02}), (10, {"decode_base_s": 0.005})],
            rate=30,
        )
    before = window(limits, 4, 8)
    during = window(limits, 11, 18)  # settled: from 3 s after the change
    after = window(limits, 22, 28)
    assert before and during and after
    assert mean(during) <= 0.6 * mean(before), limits
    assert mean(after) >= 1.5 * mean(during), limits
    assert p99(enterprise) < 10.0


async def test_the_limit_follows_pressure_alone(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    # flat per-token time: latency does not move, but the KV cache fills up
    gpu = GpuConfig(max_batch=8, decode_base_s=0.01, decode_per_seq_s=0.0, max_waiting=500)
    demo, gateway, _ = await start(nursery, redis_url, tmp_path, gpu, target=5.0)
    with trio.fail_after(60):
        limits, enterprise, _ = await run_phases(
            gateway,
            demo,
            [(6, {}), (10, {"kv_capacity_tokens": 100}), (10, {"kv_capacity_tokens": 65536})],
            rate=25,
        )
    before = window(limits, 3, 6)
    during = window(limits, 6, 16)
    after = window(limits, 20, 26)
    assert before and during and after
    assert min(during) <= 0.75 * (sum(before) / len(before)), limits
    assert max(after) > min(during) + 2, limits
    assert p99(enterprise) < 10.0


async def test_sighup_reloads_the_gains(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    gpu = GpuConfig()
    _, gateway, path = await start(nursery, redis_url, tmp_path, gpu, target=0.6)
    path.write_text(path.read_text().replace("increase_step = 1", "increase_step = 4"))
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(10):
            os.kill(os.getpid(), signal.SIGHUP)
            while True:
                r = await client.get(gateway + "/admin/v1/controller", headers=ADMIN)
                if r.json()["gains"]["increase_step"] == 4:
                    break
                await trio.sleep(0.05)
