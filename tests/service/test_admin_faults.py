"""The admin API and the replicas' shared state when Redis misbehaves: fresh reads, a
malformed gains document that no replica may crash on, and Redis paused or killed under the
admin API (every route that needs Redis answers 503 with Retry-After within the Redis
timeout; a gains change is applied everywhere or nowhere)."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import coredis
import httpx2
import pytest
import trio

from backends.redis.embedded import EmbeddedRedis
from scheduler.service.config import load_settings
from scheduler.service.serve import with_demo_url
from tests.conftest import start_demo, start_gateway
from tests.service.test_admin import ADMIN, CONFIG, TOKEN, chat, eventually
from tests.support.error_shape import error_fields

PREFIX = f"admin-faults-{uuid.uuid4().hex}"


@pytest.fixture
async def replicas(nursery: trio.Nursery, redis_url: str, tmp_path: Path) -> tuple[str, str]:
    """Two replicas on one Redis, under this module's own key prefix."""
    demo = await start_demo(nursery)
    path = tmp_path / "admin.toml"
    path.write_text(CONFIG.replace("{prefix}", PREFIX))
    settings = load_settings(path, env={"SCHEDULER_ADMIN_TOKEN": TOKEN}, overrides={"port": 0})
    settings = dataclasses.replace(with_demo_url(settings, demo), redis_url=redis_url)
    return await start_gateway(nursery, settings), await start_gateway(nursery, settings)


async def test_a_key_read_through_the_admin_api_is_fresh(replicas: tuple[str, str]) -> None:
    """Revoked on one replica, the other's admin API says so at once (not from its cache)."""
    a, b = replicas
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            created = (
                await client.post(
                    a + "/admin/v1/keys", json={"tenant": "t", "tier": "pro"}, headers=ADMIN
                )
            ).json()
            kid = created["key_id"]
            assert (await chat(client, b, created["key"])).status_code == 200  # b caches it
            r = await client.get(f"{b}/admin/v1/keys/{kid}", headers=ADMIN)
            assert r.json()["revoked"] is False
            assert (
                await client.delete(f"{a}/admin/v1/keys/{kid}", headers=ADMIN)
            ).status_code == 200
            r = await client.get(f"{b}/admin/v1/keys/{kid}", headers=ADMIN)
            assert r.status_code == 200 and r.json()["revoked"] is True


async def test_a_malformed_gains_document_is_ignored_logged_once_and_counted(
    replicas: tuple[str, str], redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = replicas
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(30):
            r = await client.put(
                a + "/admin/v1/controller", json={"increase_step": 3}, headers=ADMIN
            )
            assert r.status_code == 200

            async def on_b() -> bool:
                r = await client.get(b + "/admin/v1/controller", headers=ADMIN)
                return bool(r.json()["gains"]["increase_step"] == 3)

            await eventually(on_b, 5)
            document = {"version": 10**6, "gains": {"increase_step": 5, "warp_drive": 1}}
            with caplog.at_level(logging.ERROR, logger="scheduler.service"):
                async with coredis.Redis.from_url(redis_url) as redis:
                    await redis.set(f"{PREFIX}:control:gains", json.dumps(document))

                async def counted() -> bool:
                    text = (await client.get(b + "/metrics")).text
                    return "scheduler_gains_rejected_total 1.0" in text

                await eventually(counted, 5)
                await trio.sleep(1.2)  # two more polls of the same document: no new line
            for url in (a, b):  # both replicas alive, serving, on the last good gains
                assert (await client.get(url + "/healthz")).status_code == 200
                gains = (await client.get(url + "/admin/v1/controller", headers=ADMIN)).json()
                assert gains["gains"]["increase_step"] == 3
    lines = [r for r in caplog.records if "gains in Redis not applied" in r.getMessage()]
    assert len(lines) == 2  # once per replica


REDIS_TIMEOUT_S = 0.1  # the replicas' redis.timeout_s (the default)
ANSWER_WITHIN_S = REDIS_TIMEOUT_S + 0.6  # the Redis timeout, plus this machine's own delays


@pytest.fixture
async def private(
    nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[tuple[EmbeddedRedis, str, str]]:
    """A redis-server of this test's own (it is paused or killed), and two replicas on it."""
    with EmbeddedRedis() as redis:
        demo = await start_demo(nursery)
        path = tmp_path / "admin.toml"
        path.write_text(CONFIG.replace("{prefix}", PREFIX))
        env = {"SCHEDULER_ADMIN_TOKEN": TOKEN}
        settings = load_settings(path, env=env, overrides={"port": 0})
        settings = dataclasses.replace(with_demo_url(settings, demo), redis_url=redis.url)
        assert settings.redis_timeout_s == REDIS_TIMEOUT_S
        a, b = await start_gateway(nursery, settings), await start_gateway(nursery, settings)
        try:
            yield redis, a, b
        finally:
            assert redis.process is not None
            redis.process.send_signal(signal.SIGCONT)  # a stopped process cannot end


def redis_routes(kid: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    """Every admin route that needs Redis: (method, path, body)."""
    key = f"/admin/v1/keys/{kid}"
    return [
        ("GET", "/admin/v1/keys", None),
        ("POST", "/admin/v1/keys", {"tenant": "t", "tier": "pro"}),
        ("GET", key, None),
        ("DELETE", key, None),
        ("PUT", key + "/quota", {"requests": 5}),
        ("POST", key + "/upgrades", {"requests": 5, "expires_in_s": 60}),
        ("POST", key + "/credits", {"amount": 10}),
        ("PUT", "/admin/v1/controller", {"increase_step": 5}),
    ]


async def prepared(client: httpx2.AsyncClient, a: str, b: str) -> str:
    """A key, and gains published (increase_step 3) and taken up by both replicas."""
    r = await client.post(a + "/admin/v1/keys", json={"tenant": "t", "tier": "pro"}, headers=ADMIN)
    assert r.status_code == 201
    kid = str(r.json()["key_id"])
    r = await client.put(a + "/admin/v1/controller", json={"increase_step": 3}, headers=ADMIN)
    assert r.status_code == 200

    async def on_b() -> bool:
        return await increase_step(client, b) == 3

    await eventually(on_b, 5)
    return kid


async def increase_step(client: httpx2.AsyncClient, url: str) -> float:
    r = await client.get(url + "/admin/v1/controller", headers=ADMIN)
    assert r.status_code == 200  # no Redis needed
    return float(r.json()["gains"]["increase_step"])


async def assert_every_redis_route_is_a_quick_503(
    client: httpx2.AsyncClient, url: str, kid: str
) -> None:
    slowest_s = 0.0
    for method, path, body in redis_routes(kid):
        started = trio.current_time()
        r = await client.request(method, url + path, json=body, headers=ADMIN)
        took_s = trio.current_time() - started
        where = f"{method} {path}: {r.status_code} {r.text[:200]} in {took_s:.2f} s"
        assert r.status_code == 503, where
        assert int(r.headers["retry-after"]) >= 1, where
        assert set(r.json()["error"]) == error_fields(503), where
        assert r.json()["error"]["code"] == "redis_unavailable", where
        assert took_s < ANSWER_WITHIN_S, where
        slowest_s = max(slowest_s, took_s)
    print(f"slowest 503 of {len(redis_routes(kid))} Redis routes: {slowest_s:.3f} s")


async def test_a_paused_redis_makes_every_redis_route_a_quick_503_and_no_gains_change(
    private: tuple[EmbeddedRedis, str, str],
) -> None:
    redis, a, b = private
    assert redis.process is not None
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(30):
            kid = await prepared(client, a, b)
            redis.process.send_signal(signal.SIGSTOP)
            await assert_every_redis_route_is_a_quick_503(client, a, kid)
            assert await increase_step(client, a) == 3  # the refused change: not applied here
            redis.process.send_signal(signal.SIGCONT)
            # what reached the paused Redis is done now (before it answers this new client):
            # the refused change must not have been written behind the 503
            async with coredis.Redis.from_url(redis.url) as direct:
                document = json.loads(await direct.get(f"{PREFIX}:control:gains") or b"{}")
            assert document["gains"]["increase_step"] == 3, document
            for url in (a, b):
                assert await increase_step(client, url) == 3


async def test_a_killed_redis_makes_every_redis_route_a_503_and_the_rest_keeps_working(
    private: tuple[EmbeddedRedis, str, str],
) -> None:
    redis, a, b = private
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(30):
            kid = await prepared(client, a, b)
            redis.stop()
            await assert_every_redis_route_is_a_quick_503(client, a, kid)
            for url in (a, b):  # the change was refused: applied nowhere
                assert await increase_step(client, url) == 3
            r = await client.post(a + "/admin/v1/drain", headers=ADMIN)
            assert r.status_code == 200  # an SRE can still drain during the outage
