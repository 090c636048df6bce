"""The admin API through real sockets, with two replicas sharing one Redis."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from scheduler.service.config import load_settings
from scheduler.service.serve import with_demo_url
from tests.conftest import start_demo, start_gateway

TOKEN = "admin-secret-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
CHAT = {"model": "demo-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
CONFIG = """
[redis]
prefix = "{prefix}"
[tiers.pro]
weight = 3
max_wait_s = 5
max_depth = 100
[tiers.pro.quota]
algorithm = "sliding_log"
requests = 1000
period_s = 60
[[keys]]
key = "sk-config-pro"
tenant = "config-tenant"
tier = "pro"
[models.demo-small]
backends = ["demo"]
"""


@pytest.fixture
async def replicas(nursery: trio.Nursery, redis_url: str, tmp_path: Path) -> tuple[str, str]:
    demo = await start_demo(nursery)
    path = tmp_path / "admin.toml"
    path.write_text(CONFIG.replace("{prefix}", f"admin-{uuid.uuid4().hex}"))
    settings = load_settings(path, env={"SCHEDULER_ADMIN_TOKEN": TOKEN}, overrides={"port": 0})
    settings = dataclasses.replace(with_demo_url(settings, demo), redis_url=redis_url)
    return await start_gateway(nursery, settings), await start_gateway(nursery, settings)


async def chat(client: httpx2.AsyncClient, url: str, key: str) -> httpx2.Response:
    headers = {"authorization": f"Bearer {key}"}
    return await client.post(url + "/v1/chat/completions", json=CHAT, headers=headers)


async def eventually(check: Any, timeout_s: float) -> float:
    """Poll `check` until it returns True; returns how long it took."""
    start = trio.current_time()
    with trio.fail_after(timeout_s):
        while not await check():
            await trio.sleep(0.05)
    return trio.current_time() - start


async def test_admin_refuses_bad_tokens_and_bad_bodies(replicas: tuple[str, str]) -> None:
    a, _ = replicas
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            assert (await client.get(a + "/admin/v1/keys")).status_code == 401
            bad = {"authorization": "Bearer nope"}
            assert (await client.get(a + "/admin/v1/keys", headers=bad)).status_code == 401
            tenant = {"authorization": "Bearer sk-config-pro"}
            r = await client.get(a + "/admin/v1/keys", headers=tenant)
            assert r.status_code == 401 and set(r.json()["error"]) == {
                "message",
                "type",
                "param",
                "code",
            }
            url = a + "/admin/v1/keys"
            assert (await client.post(url, content=b"{", headers=ADMIN)).status_code == 400
            assert (await client.post(url, json={"tier": "pro"}, headers=ADMIN)).status_code == 400
            r = await client.post(url, json={"tenant": "t", "tier": "gold"}, headers=ADMIN)
            assert r.status_code == 400 and "tier" in r.json()["error"]["message"]
            r = await client.get(a + "/admin/v1/keys", headers=ADMIN)
            kid = r.json()["data"][0]["key_id"]
            r = await client.put(f"{url}/{kid}/quota", json={"requests": -5}, headers=ADMIN)
            assert r.status_code == 400 and "quota.requests" in r.json()["error"]["message"]
            r = await client.post(f"{url}/{kid}/upgrades", json={"requests": 5}, headers=ADMIN)
            assert r.status_code == 400 and "expires_in_s" in r.json()["error"]["message"]
            r = await client.put(
                a + "/admin/v1/controller", json={"decrease_factor": 3}, headers=ADMIN
            )
            assert r.status_code == 400 and "decrease_factor" in r.json()["error"]["message"]
            r = await client.put(a + "/admin/v1/controller", json={"warp": 9}, headers=ADMIN)
            assert r.status_code == 400 and "controller.warp" in r.json()["error"]["message"]
            assert (await client.get(url + "/nope", headers=ADMIN)).status_code == 404


async def test_keys_are_created_once_and_revoked_on_every_replica(
    replicas: tuple[str, str],
) -> None:
    a, b = replicas
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            r = await client.post(
                a + "/admin/v1/keys", json={"tenant": "acme", "tier": "pro"}, headers=ADMIN
            )
            assert r.status_code == 201
            key, kid = r.json()["key"], r.json()["key_id"]
            listed = (await client.get(b + "/admin/v1/keys", headers=ADMIN)).text
            assert kid in listed and key not in listed
            assert (await chat(client, a, key)).status_code == 200
            assert (await chat(client, b, key)).status_code == 200
            r = await client.delete(f"{a}/admin/v1/keys/{kid}", headers=ADMIN)
            assert r.status_code == 200

            async def refused_on_b() -> bool:
                return (await chat(client, b, key)).status_code == 401

            assert await eventually(refused_on_b, 5) < 1.0
            assert (await chat(client, a, key)).status_code == 401


async def test_an_upgrade_lifts_the_quota_until_it_expires(replicas: tuple[str, str]) -> None:
    a, _ = replicas
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            r = await client.post(
                a + "/admin/v1/keys", json={"tenant": "u", "tier": "pro"}, headers=ADMIN
            )
            key, kid = r.json()["key"], r.json()["key_id"]
            r = await client.put(
                f"{a}/admin/v1/keys/{kid}/quota", json={"requests": 1}, headers=ADMIN
            )
            assert r.status_code == 200
            await trio.sleep(0.6)  # the registry's cache time
            assert (await chat(client, a, key)).status_code == 200
            refused = await chat(client, a, key)
            assert refused.status_code == 429 and "retry-after" in refused.headers
            r = await client.post(
                f"{a}/admin/v1/keys/{kid}/upgrades",
                json={"requests": 100, "expires_in_s": 1.5},
                headers=ADMIN,
            )
            assert r.status_code == 201
            granted_at = trio.current_time()
            await trio.sleep(0.6)
            assert (await chat(client, a, key)).status_code == 200

            async def expired() -> bool:
                return (await chat(client, a, key)).status_code == 429

            await eventually(expired, 5)
            assert trio.current_time() - granted_at < 1.5 + 1.0


async def test_burst_credits_are_spent_when_the_quota_is_out(replicas: tuple[str, str]) -> None:
    a, _ = replicas
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            r = await client.post(
                a + "/admin/v1/keys", json={"tenant": "c", "tier": "pro"}, headers=ADMIN
            )
            key, kid = r.json()["key"], r.json()["key_id"]
            await client.put(f"{a}/admin/v1/keys/{kid}/quota", json={"requests": 1}, headers=ADMIN)
            await trio.sleep(0.6)
            assert (await chat(client, a, key)).status_code == 200
            assert (await chat(client, a, key)).status_code == 429
            r = await client.post(
                f"{a}/admin/v1/keys/{kid}/credits", json={"amount": 5000}, headers=ADMIN
            )
            assert r.status_code == 200 and r.json()["credits"] == 5000
            r = await chat(client, a, key)
            assert r.status_code == 200
            assert int(r.headers["x-ratelimit-burst-credits-spent"]) > 0
            assert int(r.headers["x-ratelimit-burst-credits-remaining"]) < 5000


async def test_gains_change_live_on_every_replica(replicas: tuple[str, str]) -> None:
    a, b = replicas
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            r = await client.put(
                a + "/admin/v1/controller",
                json={"increase_step": 3, "target_latency_s": 2.5},
                headers=ADMIN,
            )
            assert r.status_code == 200
            assert (await client.get(a + "/admin/v1/controller", headers=ADMIN)).json()["gains"][
                "increase_step"
            ] == 3

            async def on_b() -> bool:
                gains = (await client.get(b + "/admin/v1/controller", headers=ADMIN)).json()[
                    "gains"
                ]
                return bool(gains["increase_step"] == 3 and gains["target_latency_s"] == 2.5)

            assert await eventually(on_b, 5) < 1.5


async def test_drain_turns_readiness_off_and_sheds_new_requests(replicas: tuple[str, str]) -> None:
    a, b = replicas
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            assert (await client.post(a + "/admin/v1/drain", headers=ADMIN)).status_code == 200

            async def not_ready() -> bool:
                return (await client.get(a + "/readyz")).status_code == 503

            await eventually(not_ready, 5)
            r = await chat(client, a, "sk-config-pro")
            assert r.status_code == 503 and "retry-after" in r.headers
            assert (await chat(client, b, "sk-config-pro")).status_code == 200


async def test_admin_api_is_off_without_a_token(nursery: trio.Nursery, redis_url: str) -> None:
    from tests.conftest import gateway_settings

    demo = await start_demo(nursery)
    url = await start_gateway(nursery, gateway_settings(demo, redis_url))
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(10):
            assert (await client.get(url + "/admin/v1/keys", headers=ADMIN)).status_code == 404


async def test_unknown_fields_in_admin_bodies_are_refused_by_name(
    replicas: tuple[str, str],
) -> None:
    """A typo (`teir`) or a field from another version is a 400 naming it, never ignored."""
    a, _ = replicas
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            keys = a + "/admin/v1/keys"
            r = await client.post(keys, json={"tenant": "t", "tier": "pro"}, headers=ADMIN)
            kid = r.json()["key_id"]
            cases = [
                ("POST", keys, {"tenant": "t", "tier": "pro", "colour": "red"}, "colour"),
                ("PUT", f"{keys}/{kid}/quota", {"requests": 5, "burst": 9}, "burst"),
                ("POST", f"{keys}/{kid}/upgrades", {"expires_in_s": 9, "rps": 1}, "rps"),
                ("POST", f"{keys}/{kid}/credits", {"amount": 5, "ttl": 9}, "ttl"),
                ("PUT", a + "/admin/v1/controller", {"increase_step": 2, "warp": 9}, "warp"),
            ]
            for method, url, body, field in cases:
                r = await client.request(method, url, json=body, headers=ADMIN)
                assert r.status_code == 400, (method, url, r.text)
                error = r.json()["error"]
                assert field in error["message"] and error["param"] == field, error
            listed = (await client.get(keys, headers=ADMIN)).json()["data"]
            assert [k["key_id"] for k in listed if k["tenant"] == "t"] == [kid]  # none made
            gains = (await client.get(a + "/admin/v1/controller", headers=ADMIN)).json()["gains"]
            assert gains["increase_step"] != 2  # the refused body changed nothing
