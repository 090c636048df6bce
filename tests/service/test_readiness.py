"""Readiness means "this replica can serve traffic", and each change of state is logged once.

Real parts: the gateway in this process (`serve_replica`, so its log records reach `caplog`),
demo backends on loopback ports (one restartable on a fixed port), a port where nothing listens
as a dead backend, and a private redis-server started late or killed. No inference request is
sent: the backends' health must be known from the pool's own probes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from backends.demo.server import DemoConfig, serve_demo_backend
from backends.redis.embedded import EmbeddedRedis, free_port
from scheduler.service.config import Settings, load_settings
from tests.conftest import FAST_GPU, gateway_metrics, start_demo, start_gateway

KEY = "sk-readiness-test-key"
PROBE_INTERVAL_S = 0.5  # BackendPool.probe_forever's
CONFIG = """
[tiers.only]
weight = 1
fail_mode = "{fail_mode}"
[tiers.only.quota]
requests = 100000

[[keys]]
key = "{key}"
tenant = "t"
tier = "only"

[backend_limits]
connect_timeout_s = 0.5
eject_s = 0.25
max_eject_s = 1.0
"""


def settings_for(
    tmp_path: Path, models: dict[str, str], redis_url: str, fail_mode: str = "open"
) -> Settings:
    text = CONFIG.format(key=KEY, fail_mode=fail_mode)
    for name, url in models.items():
        text += f'\n[models.{name}]\nbackends = ["{url}"]\n'
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    settings = load_settings(path, env={}, overrides={"port": 0})
    return dataclasses.replace(settings, redis_url=redis_url)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


class RestartableDemo:
    """A demo backend on a fixed port that can be stopped (its port closed) and started again."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._scope, self._stopped = trio.CancelScope(), trio.Event()
        await self._nursery.start(self._serve)

    async def _serve(self, *, task_status: trio.TaskStatus[int]) -> None:
        try:
            with self._scope:
                await serve_demo_backend(
                    DemoConfig(gpu=FAST_GPU), port=self.port, task_status=task_status
                )
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        self._scope.cancel()
        await self._stopped.wait()


async def readyz(client: httpx2.AsyncClient, gateway: str) -> tuple[int, dict[str, Any]]:
    r = await client.get(gateway + "/readyz")
    return r.status_code, r.json()


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float) -> float:
    """Seconds until `check()` holds (polled every 0.02 s); fails after `within_s`."""
    started = trio.current_time()
    with trio.fail_after(within_s):
        while not await check():
            await trio.sleep(0.02)
    return trio.current_time() - started


def lines(caplog: pytest.LogCaptureFixture, *words: str) -> list[logging.LogRecord]:
    """The gateway's records whose message holds every one of `words`."""
    return [
        r
        for r in caplog.records
        if r.name.startswith("scheduler.service") and all(w in r.getMessage() for w in words)
    ]


def no_key_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if KEY in r.getMessage()]


async def test_a_dead_backend_at_start_is_reported_at_once_and_does_not_fail_readiness(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="scheduler.service")
    live, dead = await start_demo(nursery), dead_url()
    settings = settings_for(tmp_path, {"demo-small": live, "ghost": dead}, redis_url)
    with trio.fail_after(15):
        gateway = await start_gateway(nursery, settings)
        async with httpx2.AsyncClient(timeout=5) as client:
            status, body = await readyz(client, gateway)  # at once: no request sent before
    assert status == 200, body
    assert body["ready"] is True
    models = body["checks"]["backends"]["models"]
    assert models == {
        "demo-small": {"healthy": 1, "total": 1},
        "ghost": {"healthy": 0, "total": 1},
    }, body
    (ejected,) = lines(caplog, "ejected", dead)
    assert ejected.levelno == logging.WARNING
    assert not lines(caplog, "ejected", live)
    no_key_logged(caplog)


async def test_a_backend_that_dies_is_ejected_within_a_probe_interval_and_comes_back(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="scheduler.service")
    other, dying = await start_demo(nursery), RestartableDemo(nursery)
    await dying.start()
    settings = settings_for(tmp_path, {"demo-small": other, "dying": dying.url}, redis_url)
    with trio.fail_after(30):
        gateway = await start_gateway(nursery, settings)
        async with httpx2.AsyncClient(timeout=5) as client:

            async def dying_healthy(n: int) -> bool:
                status, body = await readyz(client, gateway)
                assert status == 200, body  # the other model serves throughout
                return bool(body["checks"]["backends"]["models"]["dying"]["healthy"] == n)

            assert await dying_healthy(1)
            for _ in range(2):  # two deaths and returns: one line per transition
                await dying.stop()
                ejected_after_s = await eventually(lambda: dying_healthy(0), within_s=5)
                assert ejected_after_s <= PROBE_INTERVAL_S + 0.5, ejected_after_s
                await dying.start()
                # ejected: probed again after eject_s (0.25 s), doubling up to 1 s
                back_after_s = await eventually(lambda: dying_healthy(1), within_s=5)
                assert back_after_s <= 1.0 + PROBE_INTERVAL_S + 0.5, back_after_s
            await trio.sleep(3 * PROBE_INTERVAL_S)  # the states hold: nothing more is logged
    ejected, back = (
        lines(caplog, "ejected", dying.url),
        lines(caplog, "back in rotation", dying.url),
    )
    assert len(ejected) == 2, [r.getMessage() for r in ejected]
    assert len(back) == 2, [r.getMessage() for r in back]
    assert {r.levelno for r in ejected} == {logging.WARNING}
    assert {r.levelno for r in back} == {logging.INFO}
    assert not lines(caplog, other)
    no_key_logged(caplog)


async def test_no_healthy_backend_for_any_model_is_not_ready(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, {"demo-small": dead_url()}, redis_url)
    with trio.fail_after(15):
        gateway = await start_gateway(nursery, settings)
        async with httpx2.AsyncClient(timeout=5) as client:
            status, body = await readyz(client, gateway)
    assert status == 503, body
    assert body["checks"]["backends"]["ok"] is False
    assert body["checks"]["backends"]["models"]["demo-small"] == {"healthy": 0, "total": 1}


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
async def test_redis_unreachable_at_start_then_back_then_lost_is_logged_once_each(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, fail_mode: str
) -> None:
    """With a tier that fails open the replica still serves without Redis: ready, Redis
    reported down. With every tier failing closed it would refuse every metered request:
    not ready."""
    caplog.set_level(logging.INFO, logger="scheduler.service")
    redis = EmbeddedRedis(port=free_port())  # not started yet: nothing listens
    demo = await start_demo(nursery)
    settings = settings_for(tmp_path, {"demo-small": demo}, redis.url, fail_mode)
    ready_without_redis = 200 if fail_mode == "open" else 503

    async def redis_ok(up: bool) -> bool:
        status, body = await readyz(client, gateway)
        ok = body["checks"]["redis"]["ok"]
        assert status == (200 if ok else ready_without_redis), body
        return bool(ok is up)

    try:
        with trio.fail_after(40):
            gateway = await start_gateway(nursery, settings)
            async with httpx2.AsyncClient(timeout=5) as client:
                assert await redis_ok(False)
                await trio.sleep(3 * PROBE_INTERVAL_S)  # still down: logged once, not again
                assert len(lines(caplog, "Redis unreachable at start-up")) == 1
                await trio.to_thread.run_sync(redis.start)
                await eventually(lambda: redis_ok(True), within_s=5)
                await trio.sleep(3 * PROBE_INTERVAL_S)
                assert len(lines(caplog, "Redis back")) == 1
                await trio.to_thread.run_sync(redis.stop)
                await eventually(lambda: redis_ok(False), within_s=5)
                await trio.sleep(3 * PROBE_INTERVAL_S)
    finally:
        redis.stop()
    start_up, lost, back = (
        lines(caplog, "Redis unreachable at start-up"),
        lines(caplog, "Redis lost"),
        lines(caplog, "Redis back"),
    )
    assert (len(start_up), len(lost), len(back)) == (1, 1, 1), [
        r.getMessage() for r in start_up + lost + back
    ]
    assert {r.levelno for r in start_up + lost} == {logging.WARNING}
    assert back[0].levelno == logging.INFO
    no_key_logged(caplog)


async def test_backends_out_of_rotation_put_no_pressure_on_the_controller(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    """A dead backend stops being scraped and turns stale, which reads as saturated (1.0).
    Once it is ejected it takes no requests, so it is left out: beside a live idle backend
    it must not read as half the pool saturated, and a model whose only backend is down
    must not hold the controller's one limit (every model's) at its floor."""
    demo = await start_demo(nursery)
    text = CONFIG.format(key=KEY, fail_mode="open")
    text += f'\n[models.demo-small]\nbackends = ["{demo}", "{dead_url()}"]\n'
    text += f'\n[models.ghost]\nbackends = ["{dead_url()}"]\n'
    text += "\n[controller]\ninitial_limit = 16\npressure_threshold = 0.4\ncooldown_s = 0.25\n"
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    settings = dataclasses.replace(
        load_settings(path, env={}, overrides={"port": 0}), redis_url=redis_url
    )
    stale_after_s = settings.models[0].pressure.pressure.stale_after_s
    with trio.fail_after(30):
        gateway = await start_gateway(nursery, settings)
        await trio.sleep(stale_after_s + 1.0)  # the dead ones' readings are stale by now
        metrics = await gateway_metrics(gateway)
    assert metrics["scheduler_controller_pressure"] == 0.0, metrics
    assert metrics["scheduler_controller_congested"] == 0.0, metrics
    assert metrics["scheduler_controller_limit"] >= 16, metrics
