"""Redis answering errors is Redis failing (issue 12, item 17): the tier's fail mode, the
breaker and the Redis metrics, never a 500.

A private redis-server (the test changes its configuration) is made to answer every quota
script with an error reply, as production Redis does when it is out of memory
(`maxmemory` reached under `noeviction`: `-OOM command not allowed`) or has become a replica
(`-READONLY You can't write against a read only replica`). Reads still work, so keys are
looked up and /readyz's ping passes: only the quota script fails. A tier that fails closed
answers 503 with Retry-After; one that fails open admits on its local limiter, since an error
reply is definite (the script did not take the quota). When Redis is healed it decides again.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import coredis
import httpx2
import pytest
import trio

from backends.redis.embedded import EmbeddedRedis, free_port
from scheduler.service.config import load_settings
from scheduler.service.serve import with_demo_url
from tests.conftest import start_demo, start_gateway

CONFIG = """
[tiers.open]
weight = 1
max_wait_s = 5
max_depth = 100
fail_mode = "open"
[tiers.open.quota]
algorithm = "sliding_log"
period_s = 60
requests = 1000
[tiers.closed]
weight = 1
max_wait_s = 5
max_depth = 100
fail_mode = "closed"
[tiers.closed.quota]
algorithm = "gcra"
period_s = 60
requests = 1000

[[keys]]
key = "{open}"
tenant = "open-tenant"
tier = "open"
[[keys]]
key = "{closed}"
tenant = "closed-tenant"
tier = "closed"

[models.demo-small]
backends = ["demo"]
"""
CHAT = {"model": "demo-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
DEADLINE_S = 30.0
REQUESTS_PER_TIER = 5
RECOVERY_S = 2.0  # the breaker probes again every 0.5 s

Change = Callable[[coredis.Redis[Any]], Awaitable[object]]


async def out_of_memory(redis: coredis.Redis[Any]) -> None:
    await redis.config_set({"maxmemory-policy": "noeviction"})
    await redis.config_set({"maxmemory": "1"})


async def memory_back(redis: coredis.Redis[Any]) -> None:
    await redis.config_set({"maxmemory": "0"})


async def read_only(redis: coredis.Redis[Any]) -> None:
    await redis.replicaof("127.0.0.1", free_port())  # a primary that never answers


async def writable(redis: coredis.Redis[Any]) -> None:
    await redis.replicaof()  # REPLICAOF NO ONE


async def ask(client: httpx2.AsyncClient, url: str, key: str) -> httpx2.Response:
    return await client.post(url, json=CHAT, headers={"authorization": f"Bearer {key}"})


def by_redis(r: httpx2.Response) -> bool:
    return (
        r.status_code == 200
        and "x-ratelimit-source" not in r.headers
        and r.headers.get("x-ratelimit-limit-requests") == "1000"
    )


def counters(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of counter `name` in a Prometheus text, by their labels."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0])))
            found[labels] = float(line.rsplit(" ", 1)[1])
    return found


@pytest.mark.parametrize(
    ("break_redis", "heal_redis"),
    [(out_of_memory, memory_back), (read_only, writable)],
    ids=["oom", "readonly"],
)
async def test_error_replies_follow_each_tiers_fail_mode(
    nursery: trio.Nursery, tmp_path: Path, break_redis: Change, heal_redis: Change
) -> None:
    keys = {"open": f"sk-open-{uuid.uuid4().hex}", "closed": f"sk-closed-{uuid.uuid4().hex}"}
    path = tmp_path / "errors.toml"
    path.write_text(CONFIG.format(**keys))
    with EmbeddedRedis(port=free_port()) as server, trio.fail_after(DEADLINE_S):
        demo = await start_demo(nursery)
        settings = load_settings(path, env={}, overrides={"port": 0})
        settings = dataclasses.replace(with_demo_url(settings, demo), redis_url=server.url)
        gateway = await start_gateway(nursery, settings)
        url = gateway + "/v1/chat/completions"
        async with (
            coredis.Redis.from_url(server.url) as admin,
            httpx2.AsyncClient(timeout=5.0) as client,
        ):
            for key in keys.values():
                assert by_redis(await ask(client, url, key))
            await break_redis(admin)
            answers = {
                tier: [await ask(client, url, keys[tier]) for _ in range(REQUESTS_PER_TIER)]
                for tier in keys
            }
            await trio.sleep(0.3)  # a dispatcher tick exports the Redis metrics
            metrics = (await client.get(gateway + "/metrics")).text
            await heal_redis(admin)
            with trio.fail_after(RECOVERY_S):
                while not by_redis(await ask(client, url, keys["closed"])):
                    await trio.sleep(0.05)
    for r in answers["closed"]:
        assert r.status_code == 503, (r.status_code, r.text)
        assert int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert (error["reason"], error["limit"]) == ("redis_unavailable", "tiers.closed.fail_mode")
    for r in answers["open"]:
        assert r.status_code == 200, (r.status_code, r.text)
        assert r.headers["x-ratelimit-source"] == "local"
    errors = counters(metrics, "scheduler_redis_errors_total")
    assert sum(errors.values()) >= 1, errors  # at least the calls before the breaker opened
    decisions = counters(metrics, "scheduler_fail_mode_decisions_total")
    assert decisions[(("mode", "open"), ("tier", "open"))] == REQUESTS_PER_TIER
    assert decisions[(("mode", "closed"), ("tier", "closed"))] == REQUESTS_PER_TIER
