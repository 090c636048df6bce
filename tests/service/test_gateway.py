"""The gateway through real sockets: the openai SDK, errors in OpenAI's shape, streaming."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import coredis
import httpx2
import openai
import pytest
import trio

from scheduler.service.config import DEMO_KEYS, load_settings
from tests.conftest import gateway_settings, start_demo, start_gateway

PRO = {"authorization": "Bearer sk-demo-pro"}
CHAT = {"model": "demo-small", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


@pytest.fixture
async def gateway(nursery: trio.Nursery, redis_url: str) -> str:
    demo = await start_demo(nursery)
    return await start_gateway(nursery, gateway_settings(demo, redis_url))


async def test_openai_sdk_chat_and_stream(gateway: str) -> None:
    def use_sdk() -> tuple[Any, list[str]]:
        client = openai.OpenAI(base_url=gateway + "/v1", api_key="sk-demo-pro", max_retries=0)
        whole = client.chat.completions.create(
            model="demo-small", messages=[{"role": "user", "content": "hi"}], max_tokens=12
        )
        parts = []
        for chunk in client.chat.completions.create(
            model="demo-small",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=12,
            stream=True,
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return whole, parts

    with trio.fail_after(20):
        whole, parts = await trio.to_thread.run_sync(use_sdk)
    assert whole.choices[0].message.content
    assert whole.usage.completion_tokens == 12
    assert "".join(parts).strip()


async def test_the_responses_api_is_passed_on_and_never_cached(
    nursery: trio.Nursery, redis_url: str
) -> None:
    demo = await start_demo(nursery)
    settings = gateway_settings(demo, redis_url)
    gateway = await start_gateway(nursery, settings)

    def use_sdk() -> tuple[Any, list[Any]]:
        client = openai.OpenAI(base_url=gateway + "/v1", api_key="sk-demo-pro", max_retries=0)
        whole = client.responses.create(model="demo-small", input="hi", max_output_tokens=12)
        events = list(
            client.responses.create(
                model="demo-small", input="hi", instructions="be brief", stream=True
            )
        )
        client.chat.completions.create(  # a chat answer is cached: the check below can fail
            model="demo-small", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        return whole, events

    with trio.fail_after(20):
        whole, events = await trio.to_thread.run_sync(use_sdk)
    assert whole.output_text and whole.usage.output_tokens == 12
    assert whole.status == "incomplete"  # it ran to max_output_tokens, as OpenAI's do
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == events[-1].response.output_text
    url = gateway + "/v1/responses"
    async with httpx2.AsyncClient(timeout=10) as client:
        r = await client.post(url, json={"model": "demo-small"}, headers=PRO)
        assert assert_openai_error(r, 400)["param"] == "input"
        bad = {"model": "demo-small", "input": "hi", "max_output_tokens": 0}
        r = await client.post(url, json=bad, headers=PRO)
        assert assert_openai_error(r, 400)["param"] == "max_output_tokens"
    redis = coredis.Redis.from_url(redis_url)
    async with redis:
        with trio.fail_after(5):
            while not (
                entries := [
                    k async for k in redis.scan_iter(match=f"{settings.redis_prefix}:cache:*")
                ]
            ):
                await trio.sleep(0.05)  # the chat answer's write runs in the background
    assert len(entries) == 1  # the chat answer's; neither response
    async with httpx2.AsyncClient(timeout=5) as client:
        exposition = (await client.get(gateway + "/metrics")).text
    counted = [
        line
        for line in exposition.splitlines()
        if line.startswith("scheduler_requests_total{") and 'route="responses"' in line
    ]
    assert any('outcome="admitted"' in line and line.endswith(" 2.0") for line in counted), counted


def assert_openai_error(response: httpx2.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return dict(error)


async def test_bad_requests_get_openai_shaped_errors(gateway: str) -> None:
    url = gateway + "/v1/chat/completions"
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            r = await client.post(url, content=b"{not json", headers=PRO)
            assert_openai_error(r, 400)
            r = await client.post(url, json={"model": "demo-small"}, headers=PRO)
            assert assert_openai_error(r, 400)["param"] == "messages"
            r = await client.post(url, json={"messages": CHAT["messages"]}, headers=PRO)
            assert assert_openai_error(r, 400)["param"] == "model"
            r = await client.post(url, json={**CHAT, "max_tokens": "many"}, headers=PRO)
            assert assert_openai_error(r, 400)["param"] == "max_tokens"
            r = await client.post(url, content=b"x" * (5 * 1024 * 1024), headers=PRO)
            assert_openai_error(r, 413)
            r = await client.post(url, json={**CHAT, "model": "gpt-9"}, headers=PRO)
            assert assert_openai_error(r, 404)["code"] == "model_not_found"
            r = await client.post(url, json=CHAT)
            assert assert_openai_error(r, 401)["code"] == "missing_api_key"
            r = await client.post(url, json=CHAT, headers={"authorization": "Bearer sk-nope"})
            assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
            r = await client.get(url, headers=PRO)
            assert_openai_error(r, 405)
            r = await client.get(gateway + "/v2/nothing", headers=PRO)
            assert_openai_error(r, 404)
            r = await client.post(url, content=json.dumps([1, 2]).encode(), headers=PRO)
            assert_openai_error(r, 400)
            # and the service keeps serving
            r = await client.post(url, json=CHAT, headers=PRO)
            assert r.status_code == 200
            assert r.json()["usage"]["completion_tokens"] == 8


async def test_completions_embeddings_models_and_health(gateway: str) -> None:
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            r = await client.post(
                gateway + "/v1/completions",
                json={"model": "demo-small", "prompt": "once upon", "max_tokens": 4},
                headers=PRO,
            )
            assert r.status_code == 200 and r.json()["choices"][0]["text"]
            r = await client.post(
                gateway + "/v1/embeddings",
                json={"model": "demo-small", "input": ["a", "b"]},
                headers=PRO,
            )
            assert r.status_code == 200 and len(r.json()["data"]) == 2
            r = await client.get(gateway + "/v1/models", headers=PRO)
            assert [m["id"] for m in r.json()["data"]] == ["demo-small"]
            assert (await client.get(gateway + "/healthz")).status_code == 200
            r = await client.get(gateway + "/readyz")
            assert r.status_code == 200, r.text
            assert r.json()["checks"]["redis"]["ok"]
            doc = (await client.get(gateway + "/openapi.json")).json()
            for path in (
                "/v1/chat/completions",
                "/v1/completions",
                "/v1/embeddings",
                "/v1/models",
                "/healthz",
                "/readyz",
                "/openapi.json",
            ):
                assert path in doc["paths"]
            assert (
                "Retry-After"
                in doc["paths"]["/v1/chat/completions"]["post"]["responses"]["503"]["headers"]
            )


async def test_stream_passes_through_chunk_by_chunk(gateway: str) -> None:
    body = {**CHAT, "max_tokens": 20, "stream": True}
    arrivals: list[float] = []
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            async with client.stream(
                "POST", gateway + "/v1/chat/completions", json=body, headers=PRO
            ) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                text = ""
                async for chunk in r.aiter_text():
                    arrivals.append(trio.current_time())
                    text += chunk
    assert text.rstrip().endswith("data: [DONE]")
    assert len(arrivals) > 1  # not buffered into one piece


async def test_a_client_that_leaves_mid_stream_closes_the_upstream_call(
    nursery: trio.Nursery, redis_url: str
) -> None:
    from scheduler.models.gpu import GpuConfig

    slow = GpuConfig(max_batch=4, decode_base_s=0.05, decode_per_seq_s=0.0)
    demo = await start_demo(nursery, slow)
    gateway = await start_gateway(nursery, gateway_settings(demo, redis_url))
    body = {**CHAT, "max_tokens": 400, "stream": True}
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            async with client.stream(
                "POST", gateway + "/v1/chat/completions", json=body, headers=PRO
            ) as r:
                async for _ in r.aiter_bytes():
                    break  # one chunk, then hang up
            while True:
                metrics = (await client.get(demo + "/metrics")).text
                running = [
                    line
                    for line in metrics.splitlines()
                    if line.startswith("vllm:num_requests_running")
                ]
                if running and float(running[0].split()[-1]) == 0:
                    break
                await trio.sleep(0.05)
            # the gateway's window got its slot back: more requests go through
            r = await client.post(gateway + "/v1/chat/completions", json=CHAT, headers=PRO)
            assert r.status_code == 200


async def test_a_config_file_without_keys_lets_no_demo_key_in(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    demo = await start_demo(nursery)
    path = tmp_path / "prod.toml"
    path.write_text(f"[server]\nport = 0\n[models.demo-small]\nbackends = ['{demo}']\n")
    settings = load_settings(path, env={"SCHEDULER_KEY_SECRET": "s3cret"})
    gateway = await start_gateway(nursery, dataclasses.replace(settings, redis_url=redis_url))
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            for key in DEMO_KEYS:
                r = await client.post(
                    gateway + "/v1/chat/completions",
                    json=CHAT,
                    headers={"authorization": f"Bearer {key}"},
                )
                assert assert_openai_error(r, 401)["code"] == "invalid_api_key"


async def test_the_demo_shows_its_quotas(gateway: str) -> None:
    """The README's curl example: rate-limit headers, and Free's 10 requests a minute."""
    free = {"authorization": "Bearer sk-demo-free"}
    url = gateway + "/v1/chat/completions"
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(30):
            r = await client.post(url, json=CHAT, headers=PRO)
            assert r.status_code == 200, r.text
            assert r.headers["x-ratelimit-limit-requests"] == "100"
            assert r.headers["x-ratelimit-remaining-requests"] == "99"
            assert "x-ratelimit-limit-tokens" in r.headers and "ratelimit-policy" in r.headers
            statuses = [(await client.post(url, json=CHAT, headers=free)).status_code]
            for _ in range(10):
                statuses.append((await client.post(url, json=CHAT, headers=free)).status_code)
    assert statuses == [200] * 10 + [429]
