"""The gateway in front of a real engine: llama.cpp's `llama-server`, built from source.

The engine runs a random-weight model (tests/support/llama_server.py): its text is noise, but
its slots, batching, usage accounting and `/metrics` are llama.cpp's own. The server is built
once per version into a cache (minutes on a fresh machine, nothing after) and started once for
the session; each test starts its own gateway in front of it, from the README's config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import trio

from backends.http.client import BackendLimits, HttpClient
from backends.probes.metrics import MetricsProbe
from scheduler.models.exposition import Exporter, parse_scrape
from scheduler.models.pressure import Signal
from scheduler.openai.body import prompt_text
from scheduler.service.config import Settings, load_settings
from tests.conftest import gateway_metrics, start_gateway
from tests.support.llama_server import (
    MODEL_ALIAS,
    LlamaServer,
    ServerOptions,
    ensure_llama_server,
    ensure_model,
)

ROOT = Path(__file__).resolve().parents[2]
README_URL = "http://127.0.0.1:8081"  # where the README's config expects llama-server
PARALLEL = 2
# ignore_eos: a random model may well pick its end-of-text token early; the tests want
# answers exactly as long as they ask for (llama.cpp's own field, passed through untouched)
LONG = {"ignore_eos": True}


@pytest.fixture(scope="session")
def llama() -> Iterator[LlamaServer]:
    """One llama-server for the session: 2 slots of 4096 tokens each."""
    build = ensure_llama_server(log=print)
    model = ensure_model(build)
    options = ServerOptions(parallel=PARALLEL, ctx_size=PARALLEL * 4096)
    with LlamaServer(build, model, options) as server:
        yield server


def readme_config() -> str:
    """The README's llama.cpp config (the tests run exactly what it shows)."""
    match = re.search(r"## In front of a real engine.*?```toml\n(.*?)```", README, re.S)
    assert match is not None
    return match.group(1)


README = (ROOT / "README.md").read_text()


def llama_settings(llama: LlamaServer, redis_url: str, key: str, tmp_path: Path) -> Settings:
    config = tmp_path / "llama.toml"
    config.write_text(readme_config().replace(README_URL, llama.url))
    settings = load_settings(config, env={"LLAMA_KEY": key}, overrides={"port": 0})
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    return dataclasses.replace(settings, redis_url=redis_url, redis_prefix=prefix)


@pytest.fixture
async def gateway(
    nursery: trio.Nursery, llama: LlamaServer, redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[str, str]]:
    """The gateway on the README's config, in front of llama-server; (URL, API key)."""
    key = f"sk-llama-{uuid.uuid4().hex[:8]}"
    yield await start_gateway(nursery, llama_settings(llama, redis_url, key, tmp_path)), key
    await wait_slots_idle(llama, timeout_s=20)  # leave the engine as we found it


async def busy_slots(llama: LlamaServer) -> int:
    return sum(1 for slot in await read_slots(llama) if slot["is_processing"])


async def read_slots(llama: LlamaServer) -> list[dict[str, Any]]:
    async with httpx2.AsyncClient(timeout=5) as client:
        slots: list[dict[str, Any]] = (await client.get(llama.url + "/slots")).json()
    return slots


async def wait_slots_busy(llama: LlamaServer, count: int, *, timeout_s: float) -> int:
    """The busy slots once `count` are busy by /slots or by /metrics (the last seen after
    `timeout_s`): either view alone has been seen a step behind the engine."""
    busy = 0
    with trio.move_on_after(timeout_s):
        while (busy := max(await busy_slots(llama), int(await processing(llama)))) < count:
            await trio.sleep(0.05)
    return busy


async def wait_slots_idle(llama: LlamaServer, *, timeout_s: float) -> float:
    """Seconds until no slot of llama-server is processing (fails after `timeout_s`)."""
    started_at = trio.current_time()
    with trio.fail_after(timeout_s):
        # both views: /slots alone has been seen a step behind the engine
        while await busy_slots(llama) or await processing(llama):
            await trio.sleep(0.05)
    return trio.current_time() - started_at


async def processing(llama: LlamaServer) -> float:
    """`llamacpp:requests_processing` from the engine's own /metrics."""
    async with httpx2.AsyncClient(timeout=5) as client:
        text = (await client.get(llama.url + "/metrics")).text
    found = re.search(r"^llamacpp:requests_processing (\S+)$", text, re.MULTILINE)
    assert found, text
    return float(found.group(1))


def chat(content: str = "hello there", max_tokens: int = 16, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL_ALIAS,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        **LONG,
        **extra,
    }


async def test_openai_sdk_plain_and_streamed(gateway: tuple[str, str]) -> None:
    url, key = gateway

    def use_sdk() -> tuple[Any, list[Any]]:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)
        messages: Any = [{"role": "user", "content": "hi"}]
        whole = client.chat.completions.create(
            model=MODEL_ALIAS, messages=messages, max_tokens=12, extra_body=LONG
        )
        stream = client.chat.completions.create(
            model=MODEL_ALIAS, messages=messages, max_tokens=12, stream=True, extra_body=LONG
        )
        return whole, list(stream)

    with trio.fail_after(60):
        whole, chunks = await trio.to_thread.run_sync(use_sdk)
    assert whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]


async def test_a_route_the_engine_does_not_serve_is_told_in_its_words(
    gateway: tuple[str, str],
) -> None:
    # llama-server started without --embeddings answers /v1/embeddings 501; the client
    # gets that, OpenAI-shaped, not a 502 "the backend failed", and its SDK (which retries
    # a 5xx twice by default) is told that asking again cannot help
    url, key = gateway
    sent: list[str] = []

    def embed() -> openai.APIStatusError:
        hooks = {"request": [lambda r: sent.append(r.url.path)]}
        with httpx2.Client(event_hooks=hooks, timeout=30) as http:
            client = openai.OpenAI(base_url=url + "/v1", api_key=key, http_client=http)
            with pytest.raises(openai.APIStatusError) as caught:
                client.embeddings.create(model=MODEL_ALIAS, input="hello")
        return caught.value

    with trio.fail_after(30):
        error = await trio.to_thread.run_sync(embed, abandon_on_cancel=True)
    assert error.status_code == 501
    assert "--embeddings" in error.message, error.response.text
    assert sent == ["/v1/embeddings"]  # once: no retry
    async with httpx2.AsyncClient(timeout=30) as client:  # the engine still serves chat
        response = await client.post(
            url + "/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {key}"}
        )
    assert response.status_code == 200, response.text


async def remaining_tokens(
    client: httpx2.AsyncClient, url: str, body: dict[str, Any]
) -> tuple[int, int]:
    """(the remaining tokens this request's headers show, the usage llama.cpp reported)."""
    response = await client.post(url + "/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    used = int(response.json()["usage"]["total_tokens"])
    return int(response.headers["x-ratelimit-remaining-tokens"]), used


async def test_the_usage_llama_reports_settles_the_token_quota(gateway: tuple[str, str]) -> None:
    # The gateway reserves its estimate (prompt chars / 4 + max_tokens); llama.cpp reports its
    # own count (the chat template's tokens included). After the first answer, the key holds
    # exactly what llama.cpp reported: the second reservation, the same estimate, shows it.
    url, key = gateway
    body = chat(max_tokens=24)
    headers = {"authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(timeout=30, headers=headers) as client:
        with trio.fail_after(60):
            first = await client.post(url + "/v1/chat/completions", json=body)
            assert first.status_code == 200, first.text
            limit = int(first.headers["x-ratelimit-limit-tokens"])
            reserved = limit - int(first.headers["x-ratelimit-remaining-tokens"])
            used = first.json()["usage"]["total_tokens"]
            assert used != reserved  # the test means something only if they differ
            await trio.sleep(0.3)  # the settlement runs after the response, in the background
            after_plain, second_used = await remaining_tokens(client, url, body)
            assert limit - reserved - after_plain == used
            streamed_used = await stream_usage(client, url, body)
            await trio.sleep(0.3)
            after_stream, _ = await remaining_tokens(client, url, body)
    # the second request and the streamed one (usage from llama.cpp's last chunk) were
    # settled the same way: between the two reservations, exactly their reported usage
    assert after_plain - after_stream == second_used + streamed_used


async def stream_usage(client: httpx2.AsyncClient, url: str, body: dict[str, Any]) -> int:
    """Stream `body` with usage asked for; llama.cpp's reported total."""
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    total: int | None = None
    async with client.stream("POST", url + "/v1/chat/completions", json=streamed) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[6:]).get("usage")
                total = usage["total_tokens"] if usage else total
    assert total is not None
    return int(total)


async def test_the_responses_api_through_the_gateway(gateway: tuple[str, str]) -> None:
    # the SDK's responses.create, plain and streamed, to llama-server's /v1/responses; the
    # usage it reports (plain: in the body; streamed: inside `response.completed`, after the
    # whole answer) settles the token quota as chat's does
    url, key = gateway

    def use_sdk() -> tuple[Any, list[Any], int, int, int]:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)
        first = client.responses.with_raw_response.create(
            model=MODEL_ALIAS, input="hi", max_output_tokens=12, extra_body=LONG
        )
        events = list(
            client.responses.create(
                model=MODEL_ALIAS,
                instructions="be brief",
                input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
                max_output_tokens=40,
                stream=True,
                extra_body=LONG,
            )
        )
        trio.from_thread.run(trio.sleep, 0.3)  # the settlements run in the background
        third = client.responses.with_raw_response.create(
            model=MODEL_ALIAS, input="hi", max_output_tokens=12, extra_body=LONG
        )
        limit = int(first.headers["x-ratelimit-limit-tokens"])
        reserved = limit - int(first.headers["x-ratelimit-remaining-tokens"])
        remaining = int(third.headers["x-ratelimit-remaining-tokens"])
        return first.parse(), events, limit, reserved, remaining

    with trio.fail_after(60):
        whole, events, limit, reserved, remaining = await trio.to_thread.run_sync(use_sdk)
    assert whole.output_text and whole.usage.output_tokens == 12
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1]
    assert done.type == "response.completed" and done.response.usage.output_tokens == 40
    assert whole.usage.total_tokens != reserved  # the check means something only if so
    # what the third request saw left: the first and the stream as llama.cpp counted them,
    # and its own reservation (the first's estimate again)
    used = whole.usage.total_tokens + done.response.usage.total_tokens
    assert limit - remaining == used + reserved


async def test_a_client_gone_mid_stream_frees_the_engine_slot(
    gateway: tuple[str, str], llama: LlamaServer
) -> None:
    # The engine must be seen working on the stream before the hang-up, or the test proves
    # nothing. About 1 run in 15 neither /slots nor /metrics shows it busy within 5 s while
    # its tokens arrive (cause not found): such a start is abandoned and tried again, at
    # most 3 times; the assertion on the hang-up itself is never retried.
    for _ in range(3):
        seen = await stream_then_hang_up(gateway, llama)
        if seen is not None:
            break
        await wait_slots_idle(llama, timeout_s=30.0)
    assert seen is not None, "the engine was never seen busy with the stream"
    left_s = seen * (3000 - 20)  # the rest of 3000 tokens would take the engine this long
    freed_s = await wait_slots_idle(llama, timeout_s=min(10.0, left_s / 2))
    assert freed_s < left_s / 2, (freed_s, left_s)


async def stream_then_hang_up(gateway: tuple[str, str], llama: LlamaServer) -> float | None:
    """Stream 20 chunks of a 3000-token answer through the gateway and hang up; the seconds
    per token, or None when the engine was not seen busy with it."""
    url, key = gateway
    body = chat(max_tokens=3000, stream=True)
    headers = {"authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(timeout=30, headers=headers) as client:
        with trio.fail_after(30):
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                chunks, started_at = 0, trio.current_time()
                async for line in r.aiter_lines():
                    chunks += line.startswith("data: ")
                    if chunks == 20:
                        break
                per_token_s = (trio.current_time() - started_at) / 19
                # /slots lags the stream: right after the first tokens it may still show the
                # slot as idle with nothing decoded (seen 2 runs in 25)
                if await wait_slots_busy(llama, 1, timeout_s=5.0) != 1:
                    return None
    return per_token_s


@asynccontextmanager
async def held_streams(llama: LlamaServer, count: int) -> AsyncIterator[None]:
    """`count` long generations sent straight to llama-server (the caller waits for what it
    needs to see); ended by hanging up (llama.cpp cancels a task whose client is gone)."""
    async with httpx2.AsyncClient(timeout=30) as client, trio.open_nursery() as nursery:

        async def one() -> None:
            body = chat(max_tokens=3000, stream=True)
            async with client.stream("POST", llama.url + "/v1/chat/completions", json=body) as r:
                async for _ in r.aiter_lines():
                    pass

        for _ in range(count):
            nursery.start_soon(one)
        yield
        nursery.cancel_scope.cancel()


async def test_the_pressure_probe_reads_llama_cpp_metrics(
    llama: LlamaServer, redis_url: str, tmp_path: Path
) -> None:
    # Names as the running server exports them, not as remembered: 3 long generations on 2
    # slots is 2 processing and 1 deferred. The probe is configured as the README says.
    (model,) = llama_settings(llama, redis_url, "sk-unused", tmp_path).models
    config = model.pressure
    with trio.fail_after(60), closing(HttpClient(BackendLimits())) as client:
        probe = MetricsProbe(model.backends[0], client, config)
        async with held_streams(llama, PARALLEL + 1):
            with trio.fail_after(20):
                while "llamacpp:requests_deferred 1" not in (text := await metrics_text(llama)):
                    await trio.sleep(0.05)
            reading = await probe.scrape_once(trio.current_time())
        scrape = parse_scrape(text, at=0.0, exporters=frozenset({Exporter.LLAMACPP}))
        assert (scrape.running, scrape.waiting, scrape.kv_usage) == (2.0, 1.0, None)
        assert "# TYPE llamacpp:requests_deferred gauge" in text
        assert not [name for name in metric_names(text) if "kv" in name or "usage" in name]
        assert reading.known and not reading.stale
        assert reading.scrape is not None and reading.scrape.running == 2.0
        saturation = config.pressure.waiting_saturation
        assert reading.signals[Signal.WAITING] == pytest.approx(1 / saturation)
        assert reading.pressure == pytest.approx(1 / saturation)
        await wait_slots_idle(llama, timeout_s=20)
        idle = await probe.scrape_once(trio.current_time())
    assert idle.scrape is not None
    assert (idle.scrape.running, idle.scrape.waiting, idle.pressure) == (0.0, 0.0, 0.0)


async def test_an_engine_started_without_metrics_is_not_read_as_saturated(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # llama-server's default: no `--metrics`, and /metrics answers 501. The engine publishes
    # nothing, as a server whose /metrics is a 404 does; counted as failing it turned stale
    # and read 1.0, and the controller's limit sat at its floor for as long as it ran.
    caplog.set_level(logging.INFO, logger="scheduler.service")
    build = ensure_llama_server(log=print)
    options = ServerOptions(parallel=PARALLEL, ctx_size=PARALLEL * 1024, metrics=False)
    with LlamaServer(build, ensure_model(build), options) as bare:
        assert (await metrics_status(bare)) == 501
        settings = llama_settings(bare, redis_url, "sk-unused", tmp_path)
        stale_after_s = settings.models[0].pressure.pressure.stale_after_s
        with trio.fail_after(30):
            gateway = await start_gateway(nursery, settings)
            await trio.sleep(stale_after_s + 1.5)  # past stale, had the 501s been failures
            metrics = await gateway_metrics(gateway)
    assert metrics["scheduler_controller_pressure"] == 0.0, metrics
    assert metrics["scheduler_controller_congested"] == 0.0, metrics
    told = [r for r in caplog.records if "publishes no metrics" in r.getMessage()]
    assert len(told) == 1 and told[0].levelno == logging.WARNING, told  # once, not per scrape
    assert "501" in told[0].getMessage() and "--metrics" in told[0].getMessage()


async def test_an_engine_behind_an_api_key(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    # llama-server --api-key (vLLM's --api-key alike) refuses /v1/*, /metrics and /slots
    # without it. The gateway sends the model's `api_key_env` to each of them; without it,
    # the engine's 401 is the gateway's failure, not the client's: a 502 that says so.
    engine_key = f"engine-{uuid.uuid4().hex}"
    build = ensure_llama_server(log=print)
    options = ServerOptions(
        parallel=PARALLEL, ctx_size=PARALLEL * 1024, extra_args=("--api-key", engine_key)
    )
    client_key = f"sk-llama-{uuid.uuid4().hex[:8]}"
    chat = {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with LlamaServer(build, ensure_model(build), options) as keyed, trio.fail_after(60):
        assert (await metrics_status(keyed)) == 401
        keyless = await start_gateway(
            nursery, llama_settings(keyed, redis_url, client_key, tmp_path)
        )
        config = tmp_path / "keyed.toml"
        config.write_text(
            readme_config()
            .replace(README_URL, keyed.url)
            .replace("backends = [", 'api_key_env = "ENGINE_KEY"\nbackends = [', 1)
        )
        env = {"LLAMA_KEY": client_key, "ENGINE_KEY": engine_key}
        settings = load_settings(config, env=env, overrides={"port": 0})
        settings = dataclasses.replace(
            settings, redis_url=redis_url, redis_prefix=f"test-{uuid.uuid4().hex[:12]}"
        )
        assert engine_key not in repr(settings)
        gateway = await start_gateway(nursery, settings)
        headers = {"authorization": f"Bearer {client_key}"}
        async with httpx2.AsyncClient(timeout=30, headers=headers) as client:
            refusals = [
                await client.post(keyless + "/v1/chat/completions", json=chat) for _ in range(4)
            ]
            refused = refusals[0]
            answered = await client.post(gateway + "/v1/chat/completions", json=chat)
            streamed = await client.post(
                gateway + "/v1/chat/completions", json={**chat, "stream": True}
            )
            stale_after_s = settings.models[0].pressure.pressure.stale_after_s
            await trio.sleep(stale_after_s + 1.0)  # /metrics refused would be stale by now
            metrics = await gateway_metrics(gateway)
    assert refused.status_code == 502, refused.text
    error = refused.json()["error"]
    assert error["code"] == "backend_auth" and "api_key_env" in error["message"], error
    assert engine_key not in refused.text
    # the gateway's failure, not the client's: its quota comes back (DESIGN 2.6). A refund
    # lands after its answer is sent; the next take may, rarely, pass it on the way: hence
    # "at most one" rather than "none" (without refunds, three of four would show)
    left = [int(r.headers["x-ratelimit-remaining-requests"]) for r in refusals]
    assert left[0] - left[-1] <= 1, left
    assert answered.status_code == 200, answered.text
    assert answered.json()["usage"]["completion_tokens"] >= 1
    # llama-server's CORS header speaks for its origin, not the gateway's
    assert not [h for h in answered.headers if h.startswith("access-control-")], answered.headers
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text, streamed.text
    assert metrics["scheduler_controller_pressure"] < 1.0, metrics


async def metrics_status(llama: LlamaServer) -> int:
    async with httpx2.AsyncClient(timeout=5) as client:
        return (await client.get(llama.url + "/metrics")).status_code


def metric_names(text: str) -> list[str]:
    return re.findall(r"^# TYPE (\S+)", text, re.M)


async def test_each_slot_owns_its_share_of_the_kv_cache(llama: LlamaServer) -> None:
    # Why llama.cpp needs no KV-cache signal (scheduler/models/exposition.py): started with an
    # explicit --parallel, it splits the context evenly between the slots, so a request can
    # fill only its own slot's cache and the slots (busy, deferred) are the capacity.
    async with httpx2.AsyncClient(timeout=5) as client:
        slots = (await client.get(llama.url + "/slots")).json()
    assert len(slots) == PARALLEL
    assert {slot["n_ctx"] for slot in slots} == {llama.options.ctx_size // PARALLEL}


async def metrics_text(llama: LlamaServer) -> str:
    async with httpx2.AsyncClient(timeout=5) as client:
        response = await client.get(llama.url + "/metrics")
    assert response.status_code == 200, response.text
    return response.text


async def test_a_request_sent_during_a_prompts_step_is_not_waiting_until_the_step_ends(
    llama: LlamaServer,
) -> None:
    # What the simulator's GPU model leaves out of the engine's waiting count
    # (`GpuModel.waiting_seen`): while a step computes, llama.cpp answers /metrics but declines
    # new requests until the step is over, so a request sent during a long prompt's step is
    # in no count (neither processing nor deferred) until then. One slot decodes, the other
    # takes a prompt of ~3,800 tokens; a third request, with no slot, is sent meanwhile.
    with trio.fail_after(120):
        async with held_streams(llama, 1), httpx2.AsyncClient(timeout=90) as client:
            await wait_metric(llama, "llamacpp:requests_processing 1")
            async with trio.open_nursery() as nursery:

                async def post(tokens: int, into: list[float]) -> None:
                    body = {
                        "model": MODEL_ALIAS,
                        "max_tokens": 30,
                        "prompt": prompt_text(uuid.uuid4().int >> 80, tokens),
                        **LONG,
                    }
                    r = await client.post(llama.url + "/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    into.append(r.json()["timings"]["prompt_ms"] / 1000)

                long_prompt_s: list[float] = []
                nursery.start_soon(post, 3800, long_prompt_s)
                await wait_metric(llama, "llamacpp:requests_processing 2")  # its step is next
                started_at = trio.current_time()
                nursery.start_soon(post, 8, [])
                await trio.sleep(0.2)  # the third request is with the engine
                during = parse_scrape(await metrics_text(llama), at=0.0)
                during_s = trio.current_time() - started_at
                await wait_metric(llama, "llamacpp:requests_deferred 1")
                seen_s = trio.current_time() - started_at
                after = parse_scrape(await metrics_text(llama), at=0.0)
    (prompt_s,) = long_prompt_s
    # the premise: the scrape came well inside the prompt's first step (of 2,048 tokens)
    assert during_s < 0.5 * prompt_s * 2048 / 3800, (during_s, prompt_s)
    assert (during.running, during.waiting) == (2.0, 0.0)
    assert (after.running, after.waiting) == (2.0, 1.0)
    assert seen_s > during_s


async def wait_metric(llama: LlamaServer, line: str, timeout_s: float = 30.0) -> None:
    with trio.fail_after(timeout_s):
        while line not in await metrics_text(llama):
            await trio.sleep(0.01)
