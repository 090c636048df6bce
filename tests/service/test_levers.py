"""The SRE's emergency levers (issue 17, item 10), live through the admin API of one replica
and taken up by another, on a real Redis (scheduler.service.levers): a lower backend request
timeout (fail fast), a key or a whole tenant turned into bypass, and each undone."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from scheduler.models.gpu import GpuConfig
from scheduler.service.config import load_settings
from scheduler.service.serve import with_demo_url
from tests.conftest import start_demo, start_gateway
from tests.service.test_admin import eventually

TOKEN = "admin-levers"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
SLOW_GPU = GpuConfig(max_batch=8, max_waiting=64, decode_base_s=0.02, decode_per_seq_s=0.0)
CONFIG = """
[redis]
prefix = "{prefix}"
[server]
request_timeout_s = 30
[tiers.open]
weight = 1
max_wait_s = 30
max_depth = 100
[tiers.metered]
weight = 1
max_wait_s = 30
max_depth = 100
ladder = []
[tiers.metered.quota]
requests = 1
period_s = 600

[[keys]]
key = "k-open"
tenant = "ops"
tier = "open"
[[keys]]
key = "k-acme-1"
tenant = "acme"
tier = "metered"
[[keys]]
key = "k-acme-2"
tenant = "acme"
tier = "metered"
[[keys]]
key = "k-other"
tenant = "other"
tier = "metered"

[models.demo-small]
backends = ["demo"]
cache_fresh_s = 0
"""


@pytest.fixture
async def replicas(nursery: trio.Nursery, redis_url: str, tmp_path: Path) -> tuple[str, str]:
    """Two replicas on one Redis and one slow backend (20 ms a token)."""
    demo = await start_demo(nursery, SLOW_GPU)
    path = tmp_path / "levers.toml"
    path.write_text(CONFIG.replace("{prefix}", f"levers-{uuid.uuid4().hex}"))
    settings = load_settings(path, env={"SCHEDULER_ADMIN_TOKEN": TOKEN}, overrides={"port": 0})
    settings = dataclasses.replace(with_demo_url(settings, demo), redis_url=redis_url)
    return await start_gateway(nursery, settings), await start_gateway(nursery, settings)


async def chat(
    client: httpx2.AsyncClient, gateway: str, key: str, max_tokens: int = 1
) -> httpx2.Response:
    body = {
        "model": "demo-small",
        "messages": [{"role": "user", "content": uuid.uuid4().hex}],
        "max_tokens": max_tokens,
    }
    auth = {"authorization": f"Bearer {key}"}
    return await client.post(gateway + "/v1/chat/completions", json=body, headers=auth)


async def levers(client: httpx2.AsyncClient, gateway: str) -> dict[str, Any]:
    r = await client.get(gateway + "/admin/v1/levers", headers=ADMIN)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_a_lowered_request_timeout_fails_fast_on_every_replica_and_comes_back(
    replicas: tuple[str, str],
) -> None:
    a, b = replicas
    async with httpx2.AsyncClient(timeout=20) as client:
        with trio.fail_after(30):
            assert (await chat(client, b, "k-open", 25)).status_code == 200  # ~0.5 s: in time
            r = await client.put(
                a + "/admin/v1/levers", json={"request_timeout_s": 0.2}, headers=ADMIN
            )
            assert r.status_code == 200, r.text
            assert r.json()["effective_request_timeout_s"] == 0.2

            async def lowered_on_b() -> bool:
                return bool((await levers(client, b))["effective_request_timeout_s"] == 0.2)

            await eventually(lowered_on_b, 5)
            started = trio.current_time()
            late = await chat(client, b, "k-open", 25)
            assert late.status_code == 504, late.text
            assert trio.current_time() - started < 0.45  # the lever's 0.2 s, not the 0.5 s
            assert "request_timeout_s" in late.json()["error"]["message"]

            r = await client.put(
                b + "/admin/v1/levers", json={"request_timeout_s": None}, headers=ADMIN
            )
            assert r.status_code == 200 and r.json()["request_timeout_s"] is None, r.text

            async def back_on_a() -> bool:
                return bool((await levers(client, a))["effective_request_timeout_s"] == 30)

            await eventually(back_on_a, 5)
            assert (await chat(client, a, "k-open", 25)).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"request_timeout_s": 31},  # above the config's: the lever only lowers
        {"request_timeout_s": 0},
        {"request_timeout_s": "soon"},
        {"request_timeout_s": True},
        {},
        {"request_timeout": 1},
    ],
)
async def test_a_bad_lever_is_a_400_and_changes_nothing(
    replicas: tuple[str, str], body: dict[str, Any]
) -> None:
    a, _ = replicas
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(10):
            r = await client.put(a + "/admin/v1/levers", json=body, headers=ADMIN)
            assert r.status_code == 400, r.text
            assert "request_timeout" in r.json()["error"]["message"]
            assert (await levers(client, a))["request_timeout_s"] is None
            for target, bad in (("tenants/acme", {"bypass": "yes"}), ("tenants/acme", {})):
                r = await client.patch(f"{a}/admin/v1/{target}", json=bad, headers=ADMIN)
                assert r.status_code == 400, r.text


async def test_a_tenant_turned_into_bypass_skips_its_quota_on_every_replica_and_back(
    replicas: tuple[str, str],
) -> None:
    a, b = replicas
    async with httpx2.AsyncClient(timeout=20) as client:
        with trio.fail_after(30):
            for key in ("k-acme-1", "k-acme-2", "k-other"):
                assert (await chat(client, a, key)).status_code == 200  # the one request
                assert (await chat(client, b, key)).status_code == 429
            r = await client.patch(
                a + "/admin/v1/tenants/acme", json={"bypass": True}, headers=ADMIN
            )
            assert r.status_code == 200 and r.json()["bypass_tenants"] == ["acme"], r.text

            async def bypassed_on_b() -> bool:
                return (await chat(client, b, "k-acme-1")).status_code == 200

            await eventually(bypassed_on_b, 5)
            for key in ("k-acme-1", "k-acme-2"):  # every key of the tenant, both replicas
                for url in (a, b):
                    r = await chat(client, url, key)
                    assert r.status_code == 200, r.text
                    assert "x-ratelimit-limit-requests" not in r.headers  # no quota taken
            assert (await chat(client, b, "k-other")).status_code == 429  # another tenant

            r = await client.patch(
                b + "/admin/v1/tenants/acme", json={"bypass": False}, headers=ADMIN
            )
            assert r.status_code == 200 and r.json()["bypass_tenants"] == [], r.text

            async def back_on_a() -> bool:
                return (await chat(client, a, "k-acme-2")).status_code == 429

            await eventually(back_on_a, 5)
            assert (await chat(client, b, "k-acme-1")).status_code == 429


async def test_a_key_turned_into_bypass_skips_its_quota_on_every_replica_and_back(
    replicas: tuple[str, str],
) -> None:
    a, b = replicas
    async with httpx2.AsyncClient(timeout=20) as client:
        with trio.fail_after(30):
            assert (await chat(client, a, "k-other")).status_code == 200
            assert (await chat(client, a, "k-acme-1")).status_code == 200
            listed = (await client.get(a + "/admin/v1/keys", headers=ADMIN)).json()["data"]
            kid = next(k["key_id"] for k in listed if k["tenant"] == "other")
            r = await client.patch(f"{a}/admin/v1/keys/{kid}", json={"bypass": True}, headers=ADMIN)
            assert r.status_code == 200 and r.json()["bypass"] is True, r.text

            async def bypassed_on_b() -> bool:
                return (await chat(client, b, "k-other")).status_code == 200

            await eventually(bypassed_on_b, 5)
            assert (await chat(client, b, "k-acme-1")).status_code == 429  # only that key
            r = await client.patch(
                f"{b}/admin/v1/keys/{kid}", json={"bypass": False}, headers=ADMIN
            )
            assert r.status_code == 200 and r.json()["bypass"] is False, r.text

            async def back_on_a() -> bool:
                return (await chat(client, a, "k-other")).status_code == 429

            await eventually(back_on_a, 5)
            r = await client.patch(f"{a}/admin/v1/keys/nope", json={"bypass": True}, headers=ADMIN)
            assert r.status_code == 404, r.text
