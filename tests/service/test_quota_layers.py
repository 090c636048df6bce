"""Multi-layer quotas (issue 17 item 5) through the real app on a real Redis: a key's own, its
tenant's (all its keys together) and its model's (every key's requests to it), one script per
request, the binding layer named in the headers and the 429.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx2
import pytest
import trio

from policies.breaker import BreakerConfig, ScopedBreakers
from policies.ratelimit import Quota
from scheduler.core.quota_store import QuotaLayer, QuotaSpec, completed
from scheduler.service.config import ConfigError, load_settings, startup_lines
from scheduler.service.quota import (
    AdaptiveTimeout,
    FailMode,
    QuotaGuard,
    QuotaSettings,
    Source,
    Verdict,
)
from tests.conftest import start_demo, start_gateway
from tests.service.test_rejections import chat, cost, refusal, settings_for

KEYS = """
[tiers.pro]
weight = 1
max_wait_s = 5
max_depth = 100
[tiers.pro.quota]
requests = 3

[[keys]]
key = "k-a1"
tenant = "acme"
tier = "pro"
[[keys]]
key = "k-a2"
tenant = "acme"
tier = "pro"
[[keys]]
key = "k-b"
tenant = "beta"
tier = "pro"
"""
TENANTS = (
    KEYS
    + """
[tenants.acme.quota]
requests = 4
[tenants."*".quota]
requests = 2
enforce = false

[models.demo-small]
backends = ["demo"]
"""
)
MODEL = (
    KEYS
    + """
[models.demo-small]
backends = ["demo"]
[models.demo-small.quota]
requests = 3
tokens = 100000
"""
)


def would_refuse(metrics: str, layer: str) -> float:
    labels = f'layer="{layer}",reason="requests",tier="pro"'
    match = re.search(rf"scheduler_quota_would_refuse_total\{{{labels}\}} (\S+)", metrics)
    return float(match.group(1)) if match else -1.0  # -1: the series is missing


async def post(client: httpx2.AsyncClient, gateway: str, key: str, text: str) -> httpx2.Response:
    auth = {"authorization": f"Bearer k-{key}"}
    return await client.post(gateway + "/v1/chat/completions", json=chat(text), headers=auth)


async def test_two_keys_of_one_tenant_share_its_quota(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    demo = await start_demo(nursery)
    gateway = await start_gateway(nursery, settings_for(tmp_path, TENANTS, demo, redis_url))
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            sent = [
                await post(client, gateway, k, f"{k}{i}")
                for i, k in enumerate(["a1", "a1", "a2", "a2"])
            ]
            over = await post(client, gateway, "a2", "over")  # a2 has 1 of its own 3 left
            beta = [await post(client, gateway, "b", f"b{i}") for i in range(3)]
            metrics = (await client.get(gateway + "/metrics")).text

    assert [r.status_code for r in sent] == [200] * 4, [r.text for r in sent]
    first, last = sent[0].headers, sent[-1].headers
    assert first["x-ratelimit-layer-requests"] == "key"  # 2 left of its own, 3 of acme's
    assert first["x-ratelimit-remaining-requests"] == "2"
    assert first["ratelimit-policy"] == '"requests";q=3;w=60, "tenant-requests";q=4;w=60'
    assert last["x-ratelimit-layer-requests"] == "tenant"  # acme's last one
    assert last["x-ratelimit-remaining-requests"] == "0"
    error = refusal(over, 429, "requests", "tenants.acme.quota.requests")
    assert (error["threshold"], error["observed"], error["retryable"]) == (4, 5, True)
    assert "tenant" in error["message"] and "'acme'" in error["message"]
    assert over.headers["x-ratelimit-layer-requests"] == "tenant"
    # beta has no table of its own: `tenants."*"`, a shadow, says so and refuses nothing
    assert [r.status_code for r in beta] == [200] * 3
    assert [r.headers["x-scheduler-quota-shadow"] for r in beta[:2]] == ["allow"] * 2
    assert beta[2].headers["x-scheduler-quota-shadow"] == (
        "would-refuse; reason=requests; limit=tenants.*.quota.requests; threshold=2; observed=3"
    )
    assert beta[2].headers["x-ratelimit-remaining-requests"] == "0"  # its own, enforced
    # counted under the layer that would have refused, named as the headers name it
    assert would_refuse(metrics, "tenant") == 1
    assert would_refuse(metrics, "key") == 0


async def test_the_models_quota_binds_across_tenants_and_settles(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    demo = await start_demo(nursery)
    gateway = await start_gateway(nursery, settings_for(tmp_path, MODEL, demo, redis_url))
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            sent = [await post(client, gateway, k, f"{k}{i}") for i, k in enumerate(["a1", "b"])]
            await trio.sleep(0.2)  # the first two settle (queued, never waited for)
            third = await post(client, gateway, "a2", "a2")
            over = await post(client, gateway, "b", "over")  # b's own: 2 left

    assert [r.status_code for r in [*sent, third]] == [200] * 3
    used = sum(r.json()["usage"]["total_tokens"] for r in sent)
    # the model's tokens: the first two settled to their real usage, the third reserved
    remaining = 100000 - used - cost(chat("a2"))
    assert third.headers["x-ratelimit-remaining-tokens"] == str(remaining)
    assert third.headers["x-ratelimit-layer-tokens"] == "model"
    assert '"model-requests";q=3;w=60' in third.headers["ratelimit-policy"]
    error = refusal(over, 429, "requests", "models.demo-small.quota.requests")
    assert (error["threshold"], error["observed"]) == (3, 4)
    assert over.headers["x-ratelimit-layer-requests"] == "model"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[tenants.acme.quota]\nmax_concurrency = 2\n", "tenants.acme.quota.max_concurrency"),
        ("[tenants.acme.quota]\nenforce = false\n", "a shared quota needs requests or tokens"),
        ("[tenants.acme]\nweight = 2\n", "tenants.acme.weight: unknown field"),
        (
            '[models.m]\nbackends = ["demo"]\n[models.m.quota]\nrequests = 9\n'
            'algorithm = "sliding_log"\n',
            "models.m.quota.algorithm: a shared quota is counted by sliding_counter or gcra",
        ),
    ],
)
def test_a_shared_quota_table_is_checked(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(KEYS + table)
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        load_settings(path, env={})


def test_redis_out_the_fail_open_limiter_keeps_each_layer_at_this_replicas_share() -> None:
    """With Redis out, a fail-open tier admits on each layer's share (the tenant's 4 over 2
    replicas: 2 here), every layer or none, and a failed call gives back on every layer."""
    guard = QuotaGuard(
        None, ScopedBreakers(BreakerConfig()), replicas=2, timeout=AdaptiveTimeout(0.1)
    )
    own = QuotaSettings(requests=10)
    tenant = QuotaLayer("tenant", "acme", QuotaSpec("sliding_counter", Quota(4, 60.0)))

    def check(key: str) -> Verdict:
        verdict = completed(
            guard.check(key, own, FailMode.OPEN, token_cost=1, now=5.0, layers=[tenant])
        )
        assert verdict.source is Source.LOCAL
        return verdict

    first, second, third = check("a1"), check("a2"), check("a2")
    assert first.allowed and second.allowed and not third.allowed
    assert third.key_fits and not third.layers[0].fits  # a2 is under its own share (5)
    hold = guard.hold("a1", own, first, reserved=1)
    assert hold is not None
    hold.settle(used=0, failed=True, now=5.0)  # the tenant's unit back too
    assert check("a2").allowed


def test_start_up_names_each_shared_quota(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(TENANTS)
    lines = startup_lines(load_settings(path, env={}))
    assert "tenant acme: 4 requests per 60 s for all its keys (sliding_counter)" in lines
    shadow = "tenant *: 2 requests per 60 s for all its keys (sliding_counter, shadow: "
    assert any(line.startswith(shadow) for line in lines), lines
