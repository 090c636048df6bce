"""Health-driven quotas (issue 17, item 4) through the real HTTP app on a real Redis: while
the controller reports congestion, a tier with `congested_factor` is checked against that
fraction of its quota, and says so in its rate-limit headers; a tier without one, and the
same tier once the congestion is over, get their whole quota."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from scheduler.models.gpu import GpuConfig
from scheduler.service.config import ConfigError, load_settings
from scheduler.service.quota import QuotaSettings
from scheduler.service.quota_headers import FACTOR_HEADER
from scheduler.service.serve import with_demo_url
from tests.conftest import start_demo, start_gateway
from tests.service.test_admin import eventually

TOKEN = "admin-health-quota"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
# one request at a time, each slower (40 ms) than the controller's 10 ms target: congested
# in every tick that sees an answer, and not in one that sees none
SLOW_GPU = GpuConfig(max_batch=1, max_waiting=64, decode_base_s=0.02, decode_per_seq_s=0.0)
CONFIG = """
[tiers.load]
weight = 8
max_wait_s = 30
max_depth = 1000
[tiers.load.quota]
requests = 100000
[tiers.metered]
weight = 1
max_wait_s = 30
max_depth = 1000
[tiers.metered.quota]
requests = 10
period_s = 600
congested_factor = 0.5

[[keys]]
key = "k-load"
tenant = "l"
tier = "load"
[[keys]]
key = "k-metered"
tenant = "m"
tier = "metered"

[models.demo-small]
backends = ["demo"]
cache_fresh_s = 0

[controller]
initial_limit = 1
min_limit = 1
max_limit = 1
target_latency_s = 0.01
min_utilization = 0.0
tick_s = 0.25
"""


def test_the_factor_scales_every_limit_while_congested_only() -> None:
    quotas = QuotaSettings(requests=10, tokens=1001, token_burst=3, congested_factor=0.5)
    assert quotas.under_congestion(False) is quotas
    scaled = quotas.under_congestion(True)
    assert (scaled.requests, scaled.tokens, scaled.request_burst, scaled.token_burst) == (
        5,
        500,
        0,
        1,
    )
    assert scaled.scaled_by == 0.5 and scaled.specs()[0] is not None
    assert scaled.specs()[0].quota.limit == 5  # type: ignore[union-attr]
    off = QuotaSettings(requests=10)
    assert off.under_congestion(True) is off  # off by default


@pytest.mark.parametrize("value", ["0", "1.5", "-1", '"half"'])
def test_a_factor_outside_zero_to_one_is_a_config_error(tmp_path: Path, value: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(CONFIG.replace("congested_factor = 0.5", f"congested_factor = {value}"))
    with pytest.raises(ConfigError, match=r"tiers\.metered\.quota\.congested_factor"):
        load_settings(path, env={})


def chat(content: str, max_tokens: int = 2) -> dict[str, Any]:
    return {
        "model": "demo-small",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }


async def test_a_congested_controller_halves_the_quota_and_the_headers_say_so(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    demo = await start_demo(nursery, SLOW_GPU)
    path = tmp_path / "health.toml"
    path.write_text(CONFIG)
    settings = load_settings(path, env={"SCHEDULER_ADMIN_TOKEN": TOKEN}, overrides={"port": 0})
    prefix = f"health-{uuid.uuid4().hex[:12]}"
    settings = dataclasses.replace(settings, redis_url=redis_url, redis_prefix=prefix)
    gateway = await start_gateway(nursery, with_demo_url(settings, demo))
    url = gateway + "/v1/chat/completions"

    async def congested() -> bool:
        r = await client.get(gateway + "/admin/v1/controller", headers=ADMIN)
        return bool(r.json()["congested"])

    async def not_congested() -> bool:
        return not await congested()

    async with httpx2.AsyncClient(timeout=30) as client:
        with trio.fail_after(40):
            first = await client.post(
                url, json=chat("idle"), headers={"authorization": "Bearer k-metered"}
            )
            assert first.headers["x-ratelimit-limit-requests"] == "10", first.headers
            assert FACTOR_HEADER not in first.headers
            load_answers: list[httpx2.Response] = []
            metered: list[httpx2.Response] = []
            async with trio.open_nursery() as load:
                stop = trio.Event()

                async def keep_busy(n: int) -> None:  # answers in every tick, each too slow
                    i = 0
                    while not stop.is_set():
                        auth = {"authorization": "Bearer k-load"}
                        load_answers.append(
                            await client.post(url, json=chat(f"{n}-{i}"), headers=auth)
                        )
                        i += 1

                for n in range(3):
                    load.start_soon(keep_busy, n)
                await eventually(congested, 10)

                async def send(i: int) -> None:
                    auth = {"authorization": "Bearer k-metered"}
                    metered.append(await client.post(url, json=chat(f"m{i}", 1), headers=auth))

                async with trio.open_nursery() as burst:  # 8 at once: past 5, within 10
                    for i in range(8):
                        burst.start_soon(send, i)
                stop.set()
            # under congestion: 10 x 0.5 = 5 in all; the idle one counted, so 4 more fit
            statuses = sorted(r.status_code for r in metered)
            assert statuses == [200] * 4 + [429] * 4, [r.text for r in metered]
            for r in metered:
                assert r.headers["x-ratelimit-limit-requests"] == "5", r.headers
                assert r.headers[FACTOR_HEADER] == "0.5"
                assert '"requests";q=5;' in r.headers["ratelimit-policy"]
            refused = next(r for r in metered if r.status_code == 429).json()["error"]
            assert (refused["reason"], refused["threshold"]) == ("requests", 5), refused
            assert "congested_factor" in refused["message"]
            # a tier without a factor keeps its whole quota, congested or not
            assert all(r.status_code == 200 for r in load_answers)
            assert all(r.headers["x-ratelimit-limit-requests"] == "100000" for r in load_answers)
            assert all(FACTOR_HEADER not in r.headers for r in load_answers)

            await eventually(not_congested, 10)  # ticks without answers: healthy again
            after = await client.post(
                url, json=chat("after"), headers={"authorization": "Bearer k-metered"}
            )
            assert after.status_code == 200, after.text
            assert after.headers["x-ratelimit-limit-requests"] == "10"
            assert FACTOR_HEADER not in after.headers
