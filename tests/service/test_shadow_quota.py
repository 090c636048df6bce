"""Shadow quotas (`enforce = false`, issue 17 item 6), through real sockets and a real Redis.

A shadow quota is decided exactly as an enforced one, but never refuses: a request it would
refuse is admitted, and the answer says so in `x-scheduler-quota-shadow` (with the refusal's
reason, knob, threshold and measured value), the metrics count it, and the Redis script
counts only what enforcing would have admitted.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import httpx2
import pytest
import trio

from backends.redis.embedded import free_port
from scheduler.service.config import ConfigError, key_id, load_settings, startup_lines
from tests.conftest import start_demo, start_gateway
from tests.service.test_rejections import TOKEN, chat, cost, post, settings_for

SHADOW = """
[tiers.trial]
weight = 1
max_wait_s = 5
max_depth = 100
fail_mode = "closed"
[tiers.trial.quota]
requests = 2
tokens = 1000
enforce = false
[tiers.strict]
weight = 1
max_wait_s = 5
max_depth = 100
[tiers.strict.quota]
requests = 2

[[keys]]
key = "k-trial"
tenant = "t"
tier = "trial"
[[keys]]
key = "k-strict"
tenant = "s"
tier = "strict"

[models.demo-small]
backends = ["demo"]
"""
SHADOW_HEADER = "x-scheduler-quota-shadow"


def would_refuse(metrics: str, reason: str) -> float:
    pattern = (
        rf'scheduler_quota_would_refuse_total\{{layer="key",reason="{reason}",tier="trial"\}} (\S+)'
    )
    match = re.search(pattern, metrics)
    return float(match.group(1)) if match else 0.0


async def test_a_shadow_quota_counts_reports_and_never_refuses(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    demo = await start_demo(nursery)
    gateway = await start_gateway(nursery, settings_for(tmp_path, SHADOW, demo, redis_url))
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            trial = [await post(client, gateway, "trial", chat(f"t{i}")) for i in range(4)]
            huge = await post(client, gateway, "trial", chat("big", 5000))
            strict = [await post(client, gateway, "strict", chat(f"s{i}")) for i in range(3)]
            metrics = (await client.get(gateway + "/metrics")).text

    assert [r.status_code for r in trial] == [200] * 4, [r.text for r in trial]
    assert [r.headers[SHADOW_HEADER] for r in trial[:2]] == ["allow", "allow"]
    # the two over the quota would be the third: refused ones are not counted, as enforced
    expected = "would-refuse; reason=requests; limit=tiers.trial.quota.requests; threshold=2; "
    assert [r.headers[SHADOW_HEADER] for r in trial[2:]] == [expected + "observed=3"] * 2
    for r in trial:  # a quota only being tried gives a client nothing to throttle itself on
        assert not any(h.startswith(("x-ratelimit", "ratelimit")) for h in r.headers)
    assert huge.status_code == 200, huge.text
    big = cost(chat("big", 5000))
    assert huge.headers[SHADOW_HEADER] == (
        "would-refuse; reason=tokens_too_large; limit=tiers.trial.quota.tokens; "
        f"threshold=1000; observed={big}"
    )
    assert would_refuse(metrics, "requests") == 2
    assert would_refuse(metrics, "tokens_too_large") == 1
    # an enforced quota beside it is untouched
    assert [r.status_code for r in strict] == [200, 200, 429]
    assert SHADOW_HEADER not in strict[0].headers


async def test_a_shadow_quota_spends_no_burst_credits(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    # credits are a real balance: a quota only being tried must not spend them on requests
    # it would refuse (an enforced one would, see test_admin)
    demo = await start_demo(nursery)
    settings = settings_for(tmp_path, SHADOW, demo, redis_url)
    credits = f"/admin/v1/keys/{key_id('k-trial', settings.key_secret)}/credits"
    admin = {"authorization": f"Bearer {TOKEN}"}
    gateway = await start_gateway(nursery, settings)
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            r = await client.post(gateway + credits, json={"amount": 5000}, headers=admin)
            assert r.status_code == 200, r.text
            trial = [await post(client, gateway, "trial", chat(f"c{i}")) for i in range(4)]
            r = await client.post(gateway + credits, json={"amount": 1}, headers=admin)
    assert [r.headers[SHADOW_HEADER].split(";")[0] for r in trial] == ["allow"] * 2 + [
        "would-refuse"
    ] * 2
    assert r.json()["credits"] == 5001, r.json()


async def test_a_shadow_quota_admits_when_it_cannot_be_checked(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # the tier fails closed, but a shadow quota cannot refuse: Redis gone is reported as such
    demo = await start_demo(nursery)
    gone = f"redis://127.0.0.1:{free_port()}"
    gateway = await start_gateway(nursery, settings_for(tmp_path, SHADOW, demo, gone))
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(10):
            r = await post(client, gateway, "trial", chat("x"))
    assert r.status_code == 200, r.text
    header = r.headers[SHADOW_HEADER]
    assert header.startswith("would-refuse; reason=redis_unavailable; limit=tiers.trial.fail_mode")


@pytest.mark.parametrize(
    ("quota", "message"),
    [
        ('requests = 5\nenforce = "no"', "tiers.x.quota.enforce: expected bool"),
        ("enforce = false", "tiers.x.quota.enforce: a shadow quota"),
    ],
)
def test_shadow_quota_config_is_checked(tmp_path: Path, quota: str, message: str) -> None:
    path = tmp_path / f"{uuid.uuid4().hex}.toml"
    path.write_text(f"[tiers.x]\nweight = 1\n[tiers.x.quota]\n{quota}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(path, env={})


def test_start_up_says_which_quotas_are_shadows(tmp_path: Path) -> None:
    path = tmp_path / "shadow.toml"
    path.write_text(SHADOW)
    lines = startup_lines(load_settings(path, env={}))
    assert any(line.startswith("tier trial:") and "shadow" in line for line in lines), lines
    assert not any(line.startswith("tier strict:") and "shadow" in line for line in lines)
