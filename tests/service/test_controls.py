"""Per-request controls and the per-key concurrency cap (issue 17, item 8), through the real
HTTP app, a real demo backend and a real Redis (scheduler.service.controls).

A request may lower its priority (`x-scheduler-priority`) or its queue TTL
(`x-scheduler-max-wait-s`), never raise them past its tier: asking for more is clamped, a
malformed value is a 400. A key over its `max_concurrency` is refused with a 429 that names
the cap, and its slots come back when its answers end (streams included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from scheduler.models.gpu import GpuConfig
from scheduler.openai.errors import ApiError
from scheduler.service.config import load_settings
from scheduler.service.controls import (
    MAX_WAIT_HEADER,
    PRIORITY_HEADER,
    OpenRequests,
    request_controls,
)
from tests.conftest import start_demo, start_gateway
from tests.service.test_rejections import TOKEN, settings_for
from tests.support.error_shape import error_fields

SLOW_GPU = GpuConfig(max_batch=1, max_waiting=64, decode_base_s=0.02, decode_per_seq_s=0.0)

CONFIG = """
[tiers.gold]
weight = 8
max_wait_s = 30
max_depth = 100
ladder = []
[tiers.silver]
weight = 8
max_wait_s = 0.3
max_depth = 100
ladder = []
[tiers.bronze]
weight = 1
max_wait_s = 0.3
max_depth = 100
ladder = []
[tiers.capped]
weight = 1
max_wait_s = 30
max_depth = 100
[tiers.capped.quota]
max_concurrency = 2

[[keys]]
key = "k-gold"
tenant = "g"
tier = "gold"
[[keys]]
key = "k-bronze"
tenant = "b"
tier = "bronze"
[[keys]]
key = "k-capped"
tenant = "c"
tier = "capped"

[models.demo-small]
backends = ["demo"]
cache_fresh_s = 0

[controller]
initial_limit = 1
min_limit = 1
max_limit = 1
"""


def chat(content: str, max_tokens: int = 1, *, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "demo-small",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
    return body


def refused(r: httpx2.Response, status: int, reason: str, limit: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == error_fields(status), error
    assert (error["reason"], error["limit"]) == (reason, limit), error
    assert int(r.headers["retry-after"]) >= 1
    return error


# -- the clamp, as a plain function -------------------------------------------------------------

TIERS = load_settings(None, env={}).tiers  # enterprise 8, pro 3, free 1: waits 30, 15, 5 s
PRO = next(t for t in TIERS if t.core.name == "pro")
FREE = next(t for t in TIERS if t.core.name == "free")


def test_a_request_may_lower_its_priority_never_raise_it() -> None:
    assert request_controls({PRIORITY_HEADER: "free"}, PRO, TIERS).tier is FREE
    assert request_controls({PRIORITY_HEADER: "enterprise"}, PRO, TIERS).tier is PRO
    assert request_controls({PRIORITY_HEADER: "pro"}, PRO, TIERS).tier is PRO
    assert request_controls({}, PRO, TIERS).tier is PRO
    lowered = request_controls({PRIORITY_HEADER: "free"}, PRO, TIERS)
    assert lowered.max_wait_s == 5.0  # the lower tier's wait, not the key's 15 s


def test_a_request_may_shorten_its_queue_ttl_never_lengthen_it() -> None:
    assert request_controls({MAX_WAIT_HEADER: "2"}, PRO, TIERS).max_wait_s == 2.0
    assert request_controls({MAX_WAIT_HEADER: "0.25"}, PRO, TIERS).deadline_at(10.0) == 10.25
    longer = request_controls({MAX_WAIT_HEADER: "600"}, PRO, TIERS)
    assert longer.max_wait_s == 15.0 and longer.deadline_at(10.0) == float("inf")


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (PRIORITY_HEADER, "platinum"),
        (PRIORITY_HEADER, ""),
        (MAX_WAIT_HEADER, "abc"),
        (MAX_WAIT_HEADER, "0"),
        (MAX_WAIT_HEADER, "-1"),
        (MAX_WAIT_HEADER, "nan"),
        (MAX_WAIT_HEADER, "inf"),
        (MAX_WAIT_HEADER, "1e3"),
    ],
)
def test_a_malformed_control_is_a_400_naming_the_header(header: str, value: str) -> None:
    with pytest.raises(ApiError) as caught:
        request_controls({header: value}, PRO, TIERS)
    assert caught.value.status == 400 and caught.value.param == header


def test_open_requests_end_once_and_leave_nothing_behind() -> None:
    open_requests = OpenRequests()
    first = open_requests.enter_nowait("k", 2)
    second = open_requests.enter_nowait("k", 2)
    assert first is not None and second is not None
    assert open_requests.enter_nowait("k", 2) is None and open_requests.count("k") == 2
    first()
    first()  # a second end changes nothing
    assert open_requests.count("k") == 1
    second()
    assert open_requests.count("k") == 0 and not open_requests._open


# -- through the gateway ---------------------------------------------------------------------


@pytest.fixture
async def gateway(nursery: trio.Nursery, redis_url: str, tmp_path: Path) -> str:
    """One request at a time to a slow backend (20 ms a token)."""
    demo = await start_demo(nursery, SLOW_GPU)
    return await start_gateway(nursery, settings_for(tmp_path, CONFIG, demo, redis_url))


async def behind_a_holder(
    gateway: str, asks: dict[str, tuple[str, dict[str, str]]]
) -> dict[str, httpx2.Response]:
    """Each of `asks` (name: key, headers) sent while a gold request holds the one slot for
    ~0.8 s; their answers, and the holder's."""
    answers: dict[str, httpx2.Response] = {}
    async with httpx2.AsyncClient(timeout=20) as client:

        async def send(name: str, key: str, headers: dict[str, str], max_tokens: int) -> None:
            sent = {"authorization": f"Bearer k-{key}", **headers}
            url = gateway + "/v1/chat/completions"
            answers[name] = await client.post(url, json=chat(name, max_tokens), headers=sent)

        with trio.fail_after(20):
            async with trio.open_nursery() as load:
                load.start_soon(send, "holder", "gold", {}, 40)
                await trio.sleep(0.2)
                for name, (key, headers) in asks.items():
                    load.start_soon(send, name, key, headers, 1)
    assert answers["holder"].status_code == 200, answers["holder"].text
    return answers


async def test_a_lowered_priority_queues_as_the_lower_tier(gateway: str) -> None:
    answers = await behind_a_holder(
        gateway,
        {
            "lowered": ("gold", {PRIORITY_HEADER: "bronze"}),
            "raised": ("bronze", {PRIORITY_HEADER: "gold"}),  # clamped: still bronze
            "sideways": ("gold", {PRIORITY_HEADER: "silver"}),  # same weight: not lower
            "plain": ("gold", {}),
        },
    )
    # queued as bronze, a gold key's request is shed at bronze's 0.3 s, named as bronze's
    error = refused(answers["lowered"], 503, "deadline", "tiers.bronze.max_wait_s")
    assert error["threshold"] == 0.3 and 0.3 <= error["observed"] < 0.8, error
    # a bronze key naming gold still waits as bronze: it is shed, it does not wait 30 s
    refused(answers["raised"], 503, "deadline", "tiers.bronze.max_wait_s")
    assert answers["sideways"].status_code == 200, answers["sideways"].text
    assert answers["plain"].status_code == 200, answers["plain"].text


async def test_a_request_sets_its_own_queue_ttl_up_to_its_tiers(gateway: str) -> None:
    answers = await behind_a_holder(
        gateway,
        {
            "short": ("gold", {MAX_WAIT_HEADER: "0.2"}),
            "long": ("bronze", {MAX_WAIT_HEADER: "60"}),  # clamped to bronze's 0.3 s
            "roomy": ("gold", {MAX_WAIT_HEADER: "20"}),
        },
    )
    error = refused(answers["short"], 503, "deadline", f"request.{MAX_WAIT_HEADER}")
    assert error["threshold"] == 0.2 and 0.2 <= error["observed"] < 0.6, error
    assert answers["short"].headers["x-scheduler-shed"] == "deadline"
    error = refused(answers["long"], 503, "deadline", "tiers.bronze.max_wait_s")
    assert error["observed"] < 1.0, error
    assert answers["roomy"].status_code == 200, answers["roomy"].text


async def test_a_malformed_control_is_a_400_in_openais_shape(gateway: str) -> None:
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(10):
            for header, value in ((PRIORITY_HEADER, "platinum"), (MAX_WAIT_HEADER, "soon")):
                sent = {"authorization": "Bearer k-gold", header: value}
                r = await client.post(
                    gateway + "/v1/chat/completions", json=chat("x"), headers=sent
                )
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
                assert error["type"] == "invalid_request_error" and error["param"] == header
                assert header in error["message"]


async def test_a_key_over_its_concurrency_cap_gets_a_429_until_one_ends(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    demo = await start_demo(nursery, SLOW_GPU)
    gateway = await start_gateway(nursery, settings_for(tmp_path, CONFIG, demo, redis_url))
    url = gateway + "/v1/chat/completions"
    auth = {"authorization": "Bearer k-capped"}
    answers: list[httpx2.Response] = []
    async with httpx2.AsyncClient(timeout=20) as client:
        with trio.fail_after(20):
            async with trio.open_nursery() as load:

                async def send(max_tokens: int) -> None:
                    answers.append(await client.post(url, json=chat("c", max_tokens), headers=auth))

                async with client.stream(
                    "POST", url, json=chat("s", 30, stream=True), headers=auth
                ) as stream:  # one open as a stream, one whole: the cap of 2
                    load.start_soon(send, 10)
                    await trio.sleep(0.1)
                    over = await client.post(url, json=chat("o"), headers=auth)
                    async for _ in stream.aiter_bytes():
                        pass
            error = refused(over, 429, "concurrency", "tiers.capped.quota.max_concurrency")
            assert (error["threshold"], error["observed"], error["retryable"]) == (2, 3, True)
            assert error["code"] == "rate_limit_exceeded" and "x-scheduler-shed" not in over.headers
            assert [a.status_code for a in answers] == [200]
            # both ended (the stream at its last byte): the key's slots are back
            again = [await client.post(url, json=chat(f"a{i}"), headers=auth) for i in range(3)]
            assert [r.status_code for r in again] == [200, 200, 200]

            # the per-key override, through the admin API: 3 at once
            admin = {"authorization": f"Bearer {TOKEN}"}
            keys = (await client.get(gateway + "/admin/v1/keys", headers=admin)).json()["data"]
            kid = next(k["key_id"] for k in keys if k["tenant"] == "c")
            r = await client.put(
                gateway + f"/admin/v1/keys/{kid}/quota", json={"max_concurrency": 3}, headers=admin
            )
            assert r.status_code == 200, r.text
            await trio.sleep(0.6)  # the registry's cache time
            statuses: list[int] = []
            errors: list[dict[str, Any]] = []

            async def hold() -> None:
                r = await client.post(url, json=chat("h", 10), headers=auth)
                statuses.append(r.status_code)
                if r.status_code == 429:
                    errors.append(r.json()["error"])

            async with trio.open_nursery() as load:
                for _ in range(4):
                    load.start_soon(hold)
                    await trio.sleep(0.05)
    assert sorted(statuses) == [200, 200, 200, 429], statuses
    assert (errors[0]["limit"], errors[0]["threshold"]) == ("key.quota_override.max_concurrency", 3)


async def one_over_a_cap_of_one(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path, quota: str
) -> tuple[httpx2.Response, httpx2.Response, httpx2.Response, str]:
    """With `max_concurrency = 1` and `quota`: a request held open, one sent meanwhile, one
    after both ended, and the metrics then."""
    text = CONFIG.replace("max_concurrency = 2", f"max_concurrency = 1\n{quota}")
    demo = await start_demo(nursery, SLOW_GPU)
    gateway = await start_gateway(nursery, settings_for(tmp_path, text, demo, redis_url))
    url = gateway + "/v1/chat/completions"
    auth = {"authorization": "Bearer k-capped"}
    async with httpx2.AsyncClient(timeout=20) as client:
        with trio.fail_after(20):
            async with trio.open_nursery() as load:
                first: list[httpx2.Response] = []

                async def hold() -> None:
                    first.append(await client.post(url, json=chat("h", 20), headers=auth))

                load.start_soon(hold)
                await trio.sleep(0.15)
                over = await client.post(url, json=chat("o"), headers=auth)
            after = await client.post(url, json=chat("a"), headers=auth)
            metrics = (await client.get(gateway + "/metrics")).text
    return first[0], over, after, metrics


async def test_a_cap_refusal_takes_no_quota(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    """The cap is checked before the quota: a refused request leaves the quota as it was."""
    first, over, after, _ = await one_over_a_cap_of_one(
        nursery, redis_url, tmp_path, "requests = 100"
    )
    refused(over, 429, "concurrency", "tiers.capped.quota.max_concurrency")
    assert first.headers["x-ratelimit-remaining-requests"] == "99"
    assert after.headers["x-ratelimit-remaining-requests"] == "98"  # the refusal took none
    assert json.loads(after.content)["object"] == "chat.completion"


async def test_a_shadow_cap_admits_and_counts_under_the_keys_layer(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    """With `enforce = false` the cap refuses nothing; the metric names the key's layer, the
    one a cap belongs to (shared layers have none)."""
    first, over, _, metrics = await one_over_a_cap_of_one(
        nursery, redis_url, tmp_path, "enforce = false"
    )
    assert [first.status_code, over.status_code] == [200, 200], over.text
    series = 'scheduler_quota_would_refuse_total{layer="key",reason="concurrency",tier="capped"}'
    assert f"{series} 1.0" in metrics.splitlines()
