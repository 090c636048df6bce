"""Every 429 and 503 explains itself (issue 17, item 7), through real sockets and a real Redis.

Each kind of refusal is provoked for real: a used-up quota, a request no quota can hold, a
full queue, a deadline, congestion, a drain, Redis gone (fail closed), Redis silent (paused),
an unknown key with Redis gone, saturated and unreachable backends. Each answer must name its
reason, the knob that decided, where the knob stands and what was measured, say whether a
retry can succeed, carry `Retry-After`, and (a 503) name the reason in `x-scheduler-shed`.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import trio

from backends.redis.embedded import EmbeddedRedis, free_port
from scheduler.core import ShedReason
from scheduler.models.gpu import GpuConfig
from scheduler.openai.body import read_call
from scheduler.openai.errors import Refusal
from scheduler.service.config import Settings, load_settings
from scheduler.service.quota import DOWN_AFTER_S
from scheduler.service.refusals import SHED, quota_knob
from scheduler.service.serve import with_demo_url
from scheduler.service.tenancy import KeyRecord
from tests.conftest import start_demo, start_gateway
from tests.support.error_shape import error_fields

TOKEN = "admin-rejections"
SLOW_GPU = GpuConfig(max_batch=1, max_waiting=64, decode_base_s=0.02, decode_per_seq_s=0.0)


def fresh(role: str) -> str:
    return f"sk-{role}-{uuid.uuid4().hex}"


def chat(content: str, max_tokens: int = 4) -> dict[str, Any]:
    return {
        "model": "demo-small",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }


def cost(body: dict[str, Any]) -> int:
    return int(read_call("chat", json.dumps(body).encode(), default_max_tokens=256).cost)


def settings_for(tmp_path: Path, text: str, demo: str, redis_url: str | None) -> Settings:
    path = tmp_path / f"{uuid.uuid4().hex}.toml"
    path.write_text(text)
    env = {"SCHEDULER_ADMIN_TOKEN": TOKEN}
    settings = load_settings(path, env=env, overrides={"port": 0})
    prefix = f"rej-{uuid.uuid4().hex[:12]}"
    settings = dataclasses.replace(settings, redis_url=redis_url, redis_prefix=prefix)
    return with_demo_url(settings, demo)


def refusal(r: httpx2.Response, status: int, reason: str, limit: str) -> dict[str, Any]:
    """The answer is `status` in OpenAI's shape with the refusal's fields, naming `reason`
    and `limit`, with Retry-After (and, a 503, x-scheduler-shed); its error object."""
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == error_fields(status), error
    assert (error["reason"], error["limit"]) == (reason, limit), error
    assert error["message"] and isinstance(error["retryable"], bool), error
    assert int(r.headers["retry-after"]) >= 1, r.headers
    # the same wait to the millisecond (what the openai SDKs read first), and a refusal no
    # retry can undo tells them not to try (they retry a 429 or a 503 twice by default)
    assert 0 < int(r.headers["retry-after-ms"]) <= 1000 * int(r.headers["retry-after"]), r.headers
    assert r.headers.get("x-should-retry") == (None if error["retryable"] else "false"), r.headers
    if status == 503:
        assert r.headers["x-scheduler-shed"] == reason, r.headers
    else:
        assert "x-scheduler-shed" not in r.headers
    return error


def test_every_shed_reason_is_explained() -> None:
    assert set(SHED) == set(ShedReason)


def test_a_quota_is_named_where_it_comes_from() -> None:
    record = KeyRecord("k", "t", "pro", override=(("tokens", 5),), upgrade=(("requests", 9),))
    assert quota_knob(record, "pro", "requests") == "key.upgrade.requests"
    assert quota_knob(record, "pro", "tokens") == "key.quota_override.tokens"
    assert quota_knob(KeyRecord("k", "t", "pro"), "pro", "tokens") == "tiers.pro.quota.tokens"


@pytest.mark.parametrize(
    ("observed", "shown"),
    [(3.0004, 3.001), (2.9996, 2.999), (3.1, 3.1), (3.0016, 3.002), (4.0, 4), (0.0004, 0)],
)
def test_an_observed_value_never_reads_as_its_threshold(observed: float, shown: float) -> None:
    # a wait predicted at 3.0004 s over a 3 s max_wait_s was shown as 3.0: "3.0 > 3"?
    fields = Refusal("predicted_wait", "tiers.free.max_wait_s", 3, observed).fields()
    assert fields["observed"] == shown and fields["threshold"] == 3


QUOTA = """
[tiers.metered]
weight = 1
max_wait_s = 5
max_depth = 100
[tiers.metered.quota]
requests = 3
tokens = 2000

[[keys]]
key = "{key}"
tenant = "t"
tier = "metered"

[models.demo-small]
backends = ["demo"]
"""


async def metered(nursery: trio.Nursery, redis_url: str, tmp_path: Path) -> tuple[str, str]:
    """A gateway in front of the demo with a new key of the `metered` tier: (URL, key)."""
    key = fresh("quota")
    demo = await start_demo(nursery)
    settings = settings_for(tmp_path, QUOTA.format(key=key), demo, redis_url)
    return await start_gateway(nursery, settings), key


async def test_quota_429s_name_the_quota_its_limit_and_the_count(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    gateway, key = await metered(nursery, redis_url, tmp_path)
    auth = {"authorization": f"Bearer {key}"}
    url = gateway + "/v1/chat/completions"
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            huge = await client.post(url, json=chat("a", 5000), headers=auth)
            first = await client.post(url, json=chat("b", 1200), headers=auth)
            over_tokens = await client.post(url, json=chat("c", 1900), headers=auth)
            for content in ("d", "e"):
                ok = await client.post(url, json=chat(content), headers=auth)
                assert ok.status_code == 200, ok.text
            over_requests = await client.post(url, json=chat("f"), headers=auth)

    error = refusal(huge, 429, "tokens_too_large", "tiers.metered.quota.tokens")
    assert error["type"] == "tokens" and error["code"] == "rate_limit_exceeded"
    assert (error["threshold"], error["observed"]) == (2000, cost(chat("a", 5000)))
    assert error["retryable"] is False  # the same request can never fit
    assert first.status_code == 200, first.text

    error = refusal(over_tokens, 429, "tokens", "tiers.metered.quota.tokens")
    used = 2000 - int(over_tokens.headers["x-ratelimit-remaining-tokens"])
    assert error["threshold"] == 2000 and error["retryable"] is True
    assert error["observed"] == used + cost(chat("c", 1900)) > 2000

    error = refusal(over_requests, 429, "requests", "tiers.metered.quota.requests")
    assert error["type"] == "requests"
    assert (error["threshold"], error["observed"], error["retryable"]) == (3, 4, True)
    assert over_requests.headers["x-ratelimit-remaining-requests"] == "0"


async def test_the_openai_sdk_does_not_retry_a_request_no_quota_can_hold(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    # the SDK retries a 429 twice by default and waits out a Retry-After of up to two
    # minutes: a request over the whole per-minute token quota kept its caller two minutes
    # for two more refusals
    gateway, key = await metered(nursery, redis_url, tmp_path)
    sent: list[str] = []

    def ask() -> openai.RateLimitError:
        hooks = {"request": [lambda r: sent.append(r.url.path)]}
        with httpx2.Client(event_hooks=hooks) as http:
            client = openai.OpenAI(base_url=gateway + "/v1", api_key=key, http_client=http)
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(
                    model="demo-small",
                    messages=[{"role": "user", "content": "a"}],
                    max_tokens=5000,
                )
        return caught.value

    with trio.fail_after(20):
        error = await trio.to_thread.run_sync(ask, abandon_on_cancel=True)
    assert error.body["reason"] == "tokens_too_large", error.body  # type: ignore[index]
    assert sent == ["/v1/chat/completions"]  # once: no retry


SHEDDING = """
[tiers.steady]
weight = 8
max_wait_s = 30
max_depth = 1000
[tiers.tight]
weight = 1
max_wait_s = 30
max_depth = 1
ladder = []
[tiers.brief]
weight = 1
max_wait_s = 0.3
max_depth = 100
ladder = []
[tiers.free]
weight = 1
max_wait_s = 30
max_depth = 100
ladder = []
shed_on_overload = true

[[keys]]
key = "k-steady"
tenant = "s"
tier = "steady"
[[keys]]
key = "k-tight"
tenant = "t"
tier = "tight"
[[keys]]
key = "k-brief"
tenant = "b"
tier = "brief"
[[keys]]
key = "k-free"
tenant = "f"
tier = "free"

[models.demo-small]
backends = ["demo"]
cache_fresh_s = 0

[controller]
initial_limit = 1
min_limit = 1
max_limit = 1
target_latency_s = 0.05
min_utilization = 0.0
tick_s = 0.1
"""


@pytest.fixture
async def one_at_a_time(nursery: trio.Nursery, redis_url: str, tmp_path: Path) -> str:
    """A gateway that sends one request at a time to a slow backend (20 ms a token), and
    takes any answer slower than 50 ms for congestion."""
    demo = await start_demo(nursery, SLOW_GPU)
    return await start_gateway(nursery, settings_for(tmp_path, SHEDDING, demo, redis_url))


async def post(
    client: httpx2.AsyncClient, gateway: str, tier: str, body: dict[str, Any]
) -> httpx2.Response:
    auth = {"authorization": f"Bearer k-{tier}"}
    return await client.post(gateway + "/v1/chat/completions", json=body, headers=auth)


async def test_a_full_queue_and_a_deadline_name_their_knob(one_at_a_time: str) -> None:
    gateway = one_at_a_time
    answers: dict[str, httpx2.Response] = {}

    async def send(name: str, tier: str, max_tokens: int) -> None:
        answers[name] = await post(client, gateway, tier, chat(name, max_tokens))

    async with httpx2.AsyncClient(timeout=20) as client:
        with trio.fail_after(20):
            async with trio.open_nursery() as load:
                load.start_soon(send, "holder", "steady", 40)  # the one slot, for ~0.8 s
                await trio.sleep(0.2)
                load.start_soon(send, "queued", "tight", 1)  # the tight tier's one place
                await trio.sleep(0.1)
                load.start_soon(send, "full", "tight", 1)
                load.start_soon(send, "late", "brief", 1)  # waits past its 0.3 s

    assert answers["holder"].status_code == 200 and answers["queued"].status_code == 200
    error = refusal(answers["full"], 503, "queue_full", "tiers.tight.max_depth")
    assert (error["threshold"], error["observed"], error["retryable"]) == (1, 1, True)
    error = refusal(answers["late"], 503, "deadline", "tiers.brief.max_wait_s")
    assert error["threshold"] == 0.3 and 0.3 <= error["observed"] < 1.0, error
    assert answers["late"].headers["retry-after"] == "2"


async def test_congestion_names_the_signal_its_target_and_the_measure(one_at_a_time: str) -> None:
    gateway = one_at_a_time
    shed: list[httpx2.Response] = []
    async with httpx2.AsyncClient(timeout=20) as client:
        with trio.fail_after(20):
            async with trio.open_nursery() as load:

                async def hold() -> None:  # the slot always busy, answers always slow
                    for i in range(200):
                        await post(client, gateway, "steady", chat(f"h{i}", 8))

                load.start_soon(hold)
                load.start_soon(hold)
                for i in range(150):
                    r = await post(client, gateway, "free", chat(f"f{i}"))
                    if r.status_code == 503:
                        shed.append(r)
                        break
                    await trio.sleep(0.05)
                load.cancel_scope.cancel()
    assert shed, "the free tier was never shed on congestion"
    error = refusal(shed[0], 503, "overload", "controller.target_latency_s")
    assert error["threshold"] == 0.05 and error["observed"] > 0.05, error
    assert error["retryable"] is True


async def test_a_drained_replica_says_so(one_at_a_time: str) -> None:
    gateway = one_at_a_time
    admin = {"authorization": f"Bearer {TOKEN}"}
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(10):
            assert (await client.post(gateway + "/admin/v1/drain", headers=admin)).is_success
            drained = await post(client, gateway, "steady", chat("x"))
            assert (await client.post(gateway + "/admin/v1/undrain", headers=admin)).is_success
            again = await post(client, gateway, "steady", chat("y"))
    error = refusal(drained, 503, "draining", "replica.draining")
    assert error["retryable"] is True and drained.headers["retry-after"] == "5"
    assert again.status_code == 200, again.text


OUTAGE = """
[redis]
timeout_s = 0.1

[tiers.closed]
weight = 1
max_wait_s = 5
max_depth = 100
fail_mode = "closed"
[tiers.closed.quota]
requests = 100
[tiers.open]
weight = 1
max_wait_s = 5
max_depth = 100
fail_mode = "open"
[tiers.open.quota]
requests = 1
[tiers.roomy]
weight = 1
max_wait_s = 5
max_depth = 100
[tiers.roomy.quota]
requests = 100

[[keys]]
key = "k-closed"
tenant = "c"
tier = "closed"
[[keys]]
key = "k-open"
tenant = "o"
tier = "open"
[[keys]]
key = "k-roomy"
tenant = "r"
tier = "roomy"

[models.demo-small]
backends = ["demo"]
"""


async def test_redis_gone_fail_closed_and_an_uncheckable_key_name_their_knob(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    demo = await start_demo(nursery)
    gone = f"redis://127.0.0.1:{free_port()}"  # nothing listens: every call is refused
    gateway = await start_gateway(nursery, settings_for(tmp_path, OUTAGE, demo, gone))
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(10):
            closed = await post(client, gateway, "closed", chat("a"))
            local = [await post(client, gateway, "open", chat(c)) for c in "bc"]
            unknown = await client.post(
                gateway + "/v1/chat/completions",
                json=chat("d"),
                headers={"authorization": f"Bearer {fresh('unknown')}"},
            )
    error = refusal(closed, 503, "redis_unavailable", "tiers.closed.fail_mode")
    assert error["retryable"] is True
    # fail open: the local limiter at the key's share, and its 429 says so
    assert local[0].status_code == 200 and local[0].headers["x-ratelimit-source"] == "local"
    error = refusal(local[1], 429, "requests", "tiers.open.quota.requests")
    assert (error["threshold"], error["observed"]) == (1, 2)
    refusal(unknown, 503, "keys_unavailable", "redis.timeout_s")


@contextmanager
def paused(redis: EmbeddedRedis) -> Iterator[None]:
    assert redis.process is not None
    redis.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        redis.process.send_signal(signal.SIGCONT)


async def test_a_silent_redis_is_not_taken_for_gone_at_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # Silent (paused) is not refused: the script may still run once Redis wakes, so a fail
    # open tier must not admit on its local limiter (that could count the request twice)
    # until Redis has been silent for DOWN_AFTER_S; until then, a 503 that says so.
    demo = await start_demo(nursery)
    with EmbeddedRedis() as redis:
        gateway = await start_gateway(nursery, settings_for(tmp_path, OUTAGE, demo, redis.url))
        async with httpx2.AsyncClient(timeout=10) as client:
            with trio.fail_after(15):
                assert (await post(client, gateway, "roomy", chat("a"))).status_code == 200
                with paused(redis):
                    silent = await post(client, gateway, "roomy", chat("b"))
    error = refusal(silent, 503, "redis_unverified", "redis.down_after_s")
    assert error["threshold"] == DOWN_AFTER_S and 0 <= error["observed"] < DOWN_AFTER_S
    assert silent.headers["retry-after"] == "1"


BACKENDS = """
[tiers.pro]
weight = 1
max_wait_s = 5
max_depth = 100
ladder = []

[[keys]]
key = "k-pro"
tenant = "p"
tier = "pro"

[models.demo-small]
backends = ["demo"]
cache_fresh_s = 0
[models.nowhere]
backends = ["{nowhere}"]
cache_fresh_s = 0
"""


async def test_saturated_and_unreachable_backends_are_named(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    # the demo GPU holds one request and lets one wait: the rest get its 503 (Retry-After 1)
    demo = await start_demo(nursery, dataclasses.replace(SLOW_GPU, max_waiting=1))
    text = BACKENDS.replace("{nowhere}", f"http://127.0.0.1:{free_port()}")
    gateway = await start_gateway(nursery, settings_for(tmp_path, text, demo, redis_url))
    answers: list[httpx2.Response] = []

    async def send(i: int) -> None:
        answers.append(await post(client, gateway, "pro", chat(f"s{i}", 20)))

    async with httpx2.AsyncClient(timeout=20) as client:
        with trio.fail_after(20):
            async with trio.open_nursery() as load:
                for i in range(4):
                    load.start_soon(send, i)
            nowhere = await post(client, gateway, "pro", {**chat("n"), "model": "nowhere"})
    saturated = [r for r in answers if r.status_code == 503]
    assert saturated, [r.status_code for r in answers]
    error = refusal(saturated[0], 503, "backend_saturated", "models.demo-small.backends")
    assert error["observed"] == 503 and error["retryable"] is True
    error = refusal(nowhere, 503, "backend_unavailable", "models.nowhere.backends")
    assert error["retryable"] is True


async def test_a_key_redis_said_was_used_up_stays_refused_while_it_is_gone(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    demo = await start_demo(nursery)
    with EmbeddedRedis() as redis:
        gateway = await start_gateway(nursery, settings_for(tmp_path, OUTAGE, demo, redis.url))
        async with httpx2.AsyncClient(timeout=10) as client:
            with trio.fail_after(15):
                assert (await post(client, gateway, "open", chat("a"))).status_code == 200
                by_redis = await post(client, gateway, "open", chat("b"))
                redis.stop()
                remembered = await post(client, gateway, "open", chat("c"))
    error = refusal(by_redis, 429, "requests", "tiers.open.quota.requests")
    assert (error["threshold"], error["observed"]) == (1, 2)
    assert "x-ratelimit-source" not in by_redis.headers
    error = refusal(remembered, 429, "requests", "tiers.open.quota.requests")
    assert (error["threshold"], error["observed"]) == (1, 1)  # all of it used, Redis said
    assert remembered.headers["x-ratelimit-source"] == "local"
