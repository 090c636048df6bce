"""The demo GPU server, through real sockets: OpenAI shapes, streaming on the model's schedule,
latency under load, 503 when full, vLLM metrics, live config, disconnects.

Timing tests use decode steps of a few ms and assert on measured values with wide margins;
conditions that depend on the server's state are waited for, never slept for. The engine's
token schedule is checked exactly in virtual time (trio's autojump clock).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx2
import openai
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from backends.demo.engine import DemoEngine, Refusal, TicketState
from backends.demo.server import DemoConfig, main, serve_demo_backend
from scheduler.models.gpu import GpuConfig, GpuModel

Json = dict[str, Any]
CHAT = "/v1/chat/completions"


def gpu(**changes: Any) -> GpuConfig:
    base: Json = {"decode_base_s": 0.002, "decode_per_seq_s": 0.0}
    return GpuConfig(**(base | changes))


@asynccontextmanager
async def demo(config: DemoConfig | None = None) -> AsyncIterator[httpx2.AsyncClient]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_demo_backend, config or DemoConfig(gpu=gpu()))
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
        nursery.cancel_scope.cancel()


def chat(max_tokens: int | None = None, **extra: Any) -> Json:
    body: Json = {"model": "demo-small", "messages": [{"role": "user", "content": "x" * 40}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body | extra


async def metrics(client: httpx2.AsyncClient) -> dict[str, float]:
    """Samples by name (all carry model_name="demo-small")."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            assert sample.labels.get("model_name") == "demo-small"
            if "le" not in sample.labels:
                samples[sample.name] = sample.value
    return samples


async def wait_for_metric(client: httpx2.AsyncClient, name: str, value: float) -> None:
    while (await metrics(client))[name] != value:
        await trio.sleep(0.005)


def events(raw: bytes) -> list[bytes]:
    return [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]


async def read_events(response: httpx2.Response) -> list[tuple[float, bytes]]:
    """Each server-sent event's payload with its arrival time."""
    received: list[tuple[float, bytes]] = []
    buffer = b""
    async for data in response.aiter_bytes():
        buffer += data
        complete, _, buffer = buffer.rpartition(b"\n\n")
        received += [(trio.current_time(), e) for e in events(complete)]
    return received


def assert_openai_error(response: httpx2.Response, status: int, param: str | None = None) -> Json:
    assert response.status_code == status
    error: Json = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    return error


async def test_chat_and_text_completions_have_openai_shapes() -> None:
    with trio.fail_after(10):
        async with demo() as client:
            response = await client.post(CHAT, json=chat(max_tokens=5))
            assert response.status_code == 200
            body = response.json()
            assert body["id"].startswith("chatcmpl-")
            assert body["object"] == "chat.completion"
            assert body["model"] == "demo-small"
            assert isinstance(body["created"], int)
            (choice,) = body["choices"]
            assert choice["finish_reason"] == "length"
            assert choice["message"]["role"] == "assistant"
            assert len(choice["message"]["content"].split()) == 5
            assert body["usage"] == {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "total_tokens": 15,
            }

            text = await client.post(
                "/v1/completions", json={"model": "demo-small", "prompt": "hi"}
            )
            body = text.json()
            assert body["object"] == "text_completion"
            assert body["choices"][0]["finish_reason"] == "stop"  # the default length
            assert len(body["choices"][0]["text"].split()) == 64
            assert body["usage"]["completion_tokens"] == 64
            assert body["choices"][0]["text"].startswith(choice["message"]["content"])


async def test_the_openai_sdk_works_against_it() -> None:
    with trio.fail_after(10):
        async with demo() as client:
            sdk = openai.AsyncOpenAI(base_url=client.base_url.join("/v1"), api_key="none")
            reply = await sdk.chat.completions.create(
                model="demo-small",
                messages=[{"role": "user", "content": "hello"}],
                max_completion_tokens=3,
            )
            assert reply.usage is not None and reply.usage.completion_tokens == 3
            stream = await sdk.chat.completions.create(
                model="demo-small",
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert len(text.split()) == 4
            assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 2 + 4
            vectors = await sdk.embeddings.create(model="demo-small", input=["a", "b"])
            assert [len(d.embedding) for d in vectors.data] == [16, 16]
            (model,) = (await sdk.models.list()).data
            assert model.id == "demo-small"


async def test_a_stream_arrives_token_by_token_on_the_models_schedule() -> None:
    step_s, tokens = 0.02, 10
    with trio.fail_after(10):
        async with demo(DemoConfig(gpu=gpu(decode_base_s=step_s))) as client:
            body = chat(max_tokens=tokens, stream=True, stream_options={"include_usage": True})
            started = trio.current_time()
            async with client.stream("POST", CHAT, json=body) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                received = await read_events(response)
            whole = (await client.post(CHAT, json=chat(max_tokens=tokens))).json()

    assert received[-1][1] == b"[DONE]"
    chunks = [(at, json.loads(e)) for at, e in received[:-1]]
    *content, (_, last) = chunks
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}
    assert all(c["object"] == "chat.completion.chunk" for _, c in chunks)
    assert content[0][1]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [(at, c["choices"][0]) for at, c in content]
    assert (
        "".join(d["delta"].get("content", "") for _, d in deltas)
        == (whole["choices"][0]["message"]["content"])
    )
    assert [d["finish_reason"] for _, d in deltas][-1] == "length"
    arrivals = [at for at, _ in deltas]
    assert len(set(arrivals)) >= tokens // 2  # mostly one token per wake-up
    assert arrivals[0] - started >= 0.8 * step_s  # the first token waits for a step
    assert arrivals[-1] - arrivals[0] >= 0.8 * (tokens - 1) * step_s


async def test_more_concurrent_requests_make_each_one_slower() -> None:
    config = DemoConfig(gpu=gpu(decode_base_s=0.002, decode_per_seq_s=0.002))
    tokens = 20

    async def mean_latency_s(client: httpx2.AsyncClient, concurrent: int) -> float:
        latencies: list[float] = []

        async def one() -> None:
            started = trio.current_time()
            response = await client.post(CHAT, json=chat(max_tokens=tokens))
            assert response.json()["usage"]["completion_tokens"] == tokens
            latencies.append(trio.current_time() - started)

        async with trio.open_nursery() as nursery:
            for _ in range(concurrent):
                nursery.start_soon(one)
        return statistics.mean(latencies)

    with trio.fail_after(10):
        async with demo(config) as client:
            alone_s = await mean_latency_s(client, 1)
            crowded_s = await mean_latency_s(client, 12)
    # model: 20 steps of 4 ms alone, of 26 ms with twelve in the batch (6.5x)
    assert alone_s >= 20 * 0.004 * 0.9
    assert crowded_s > 3 * alone_s


async def test_a_full_waiting_room_answers_503_with_retry_after() -> None:
    config = DemoConfig(gpu=gpu(max_batch=1, max_waiting=1, decode_base_s=0.01))
    long = chat(max_tokens=5000, stream=True)
    with trio.fail_after(10):
        async with (
            demo(config) as client,
            client.stream("POST", CHAT, json=long) as running,
            client.stream("POST", CHAT, json=long) as waiting,
        ):
            assert (running.status_code, waiting.status_code) == (200, 200)
            refused = await client.post(CHAT, json=chat(max_tokens=5))
            error = assert_openai_error(refused, 503)
            assert (error["type"], error["code"]) == ("server_error", "overloaded")
            assert int(refused.headers["retry-after"]) >= 1
            streamed = await client.post(CHAT, json=long)
            assert_openai_error(streamed, 503)
            assert (await metrics(client))["vllm:num_requests_waiting"] == 1


async def test_metrics_show_requests_in_flight_and_count_them_after() -> None:
    config = DemoConfig(gpu=gpu(max_batch=2, decode_base_s=0.005))
    body = chat(max_tokens=20, stream=True)
    with trio.fail_after(10):
        async with demo(config) as client:
            before = await metrics(client)
            assert before["vllm:num_requests_running"] == 0
            assert before["vllm:time_to_first_token_seconds_count"] == 0
            async with (
                client.stream("POST", CHAT, json=body) as a,
                client.stream("POST", CHAT, json=body) as b,
                client.stream("POST", CHAT, json=body) as c,
            ):
                during = await metrics(client)
                assert during["vllm:num_requests_running"] == 2
                assert during["vllm:num_requests_waiting"] == 1
                usage = during["vllm:kv_cache_usage_perc"]
                assert usage == pytest.approx(2 * 30 / 65_536)
                assert during["vllm:gpu_cache_usage_perc"] == usage
                for response in (a, b, c):
                    assert (await read_events(response))[-1][1] == b"[DONE]"
            after = await metrics(client)
    assert after["vllm:num_requests_running"] == after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0
    assert after["vllm:time_to_first_token_seconds_count"] == 3
    assert after["vllm:e2e_request_latency_seconds_count"] == 3
    # the third waited for a whole request: 20 steps of 5 ms
    assert after["vllm:e2e_request_latency_seconds_sum"] >= (2 * 20 + 40) * 0.005 * 0.9
    assert after["vllm:prompt_tokens_total"] == 30
    assert after["vllm:generation_tokens_total"] == 60
    assert after["vllm:num_preemptions_total"] == 0


async def test_demo_config_changes_capacity_live() -> None:
    long = chat(max_tokens=5000, stream=True)
    with trio.fail_after(10):
        async with demo(DemoConfig(gpu=gpu(decode_base_s=0.01))) as client:
            halved = await client.post("/demo/config", json={"max_batch": 2})
            assert halved.status_code == 200
            assert halved.json()["max_batch"] == 2
            assert (await client.get("/demo/config")).json() == halved.json()
            async with (
                client.stream("POST", CHAT, json=long),
                client.stream("POST", CHAT, json=long),
                client.stream("POST", CHAT, json=long),
            ):
                now = await metrics(client)
                assert (now["vllm:num_requests_running"], now["vllm:num_requests_waiting"]) == (
                    2,
                    1,
                )
                grown = await client.post("/demo/config", json={"max_batch": 4})
                assert grown.json()["max_batch"] == 4
                now = await metrics(client)
                assert (now["vllm:num_requests_running"], now["vllm:num_requests_waiting"]) == (
                    3,
                    0,
                )

            for change, param in [
                ({"max_batch": 0}, "max_batch"),
                ({"max_batch": "8"}, "max_batch"),
                ({"decode_per_seq_s": -1}, "decode_per_seq_s"),
                ({"gpus": 2}, "gpus"),
            ]:
                response = await client.post("/demo/config", json=change)
                assert param in assert_openai_error(response, 400, param)["message"]
            assert (await client.get("/demo/config")).json()["max_batch"] == 4


async def test_a_client_that_goes_away_frees_its_slot() -> None:
    config = DemoConfig(gpu=gpu(max_batch=1, decode_base_s=0.01))
    long = chat(max_tokens=5000)
    with trio.fail_after(10):
        async with demo(config) as client:
            async with client.stream("POST", CHAT, json=long | {"stream": True}) as response:
                chunks = response.aiter_bytes()
                assert b"data: " in await anext(chunks)  # the first token: it is running
                assert (await metrics(client))["vllm:num_requests_running"] == 1
                await chunks.aclose()
            await wait_for_metric(client, "vllm:num_requests_running", 0)

            async with trio.open_nursery() as nursery:  # not streamed: gone while waiting
                nursery.start_soon(partial(client.post, CHAT, json=long))
                await wait_for_metric(client, "vllm:num_requests_running", 1)
                nursery.cancel_scope.cancel()
            await wait_for_metric(client, "vllm:num_requests_running", 0)
            quick = await client.post(CHAT, json=chat(max_tokens=2))
            assert quick.json()["usage"]["completion_tokens"] == 2
            assert (await metrics(client))["vllm:generation_tokens_total"] >= 3


async def test_bad_requests_get_openai_shaped_errors() -> None:
    with trio.fail_after(10):
        async with demo() as client:
            cases: list[tuple[str, Any, int, str | None]] = [
                (CHAT, b"{not json", 400, None),
                (CHAT, b"[1, 2]", 400, None),
                (CHAT, {"messages": []}, 400, "model"),
                (CHAT, chat() | {"model": "gpt-9"}, 404, "model"),
                (CHAT, {"model": "demo-small"}, 400, "messages"),
                (CHAT, chat(max_tokens=0), 400, "max_tokens"),
                (CHAT, chat(stream="yes"), 400, "stream"),
                (CHAT, chat(max_tokens=70_000), 400, "max_tokens"),  # over the KV cache
                ("/v1/completions", {"model": "demo-small", "prompt": ["a", "b"]}, 400, "prompt"),
                ("/v1/embeddings", {"model": "demo-small", "input": 3}, 400, "input"),
                ("/v1/nothing", {}, 404, None),
            ]
            for path, body, status, param in cases:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                response = await client.post(path, content=content)
                assert_openai_error(response, status, param)
            too_long = (await client.post(CHAT, json=chat(max_tokens=70_000))).json()
            assert too_long["error"]["code"] == "context_length_exceeded"
            missing = (await client.post(CHAT, json=chat() | {"model": "gpt-9"})).json()
            assert missing["error"]["code"] == "model_not_found"
            assert (await client.get(CHAT)).status_code == 405


async def test_embeddings_models_health_and_traceparents() -> None:
    config = DemoConfig(gpu=gpu(), model_names=("demo-small", "demo-large"), embedding_dim=8)
    with trio.fail_after(10):
        async with demo(config) as client:
            request = {"model": "demo-large", "input": ["same", "other", "same"]}
            first = (await client.post("/v1/embeddings", json=request)).json()
            vectors = [d["embedding"] for d in first["data"]]
            assert vectors[0] == vectors[2] != vectors[1]
            assert all(len(v) == 8 and math.isclose(sum(x * x for x in v), 1) for v in vectors)
            assert first["usage"] == {"prompt_tokens": 1 + 2 + 1, "total_tokens": 4}
            again = (await client.post("/v1/embeddings", json=request)).json()
            assert again["data"] == first["data"]

            models = (await client.get("/v1/models")).json()
            assert [m["id"] for m in models["data"]] == ["demo-small", "demo-large"]
            assert (await client.get("/health")).status_code == 200

            for i in range(105):
                headers = {"traceparent": f"00-{i:032x}-{i:016x}-01"}
                await client.get("/health", headers=headers)
            kept = (await client.get("/demo/traceparents")).json()["traceparents"]
            assert kept == [f"00-{i:032x}-{i:016x}-01" for i in range(5, 105)]


async def test_zero_decode_time_serves_many_requests_at_once() -> None:
    config = DemoConfig(gpu=gpu(decode_base_s=0, decode_per_seq_s=0, max_batch=8))
    done: list[int] = []

    async def client_loop(client: httpx2.AsyncClient, stream: bool) -> None:
        for _ in range(10):
            response = await client.post(CHAT, json=chat(max_tokens=32, stream=stream))
            if stream:
                assert events(response.content)[-1] == b"[DONE]"
            else:
                assert response.json()["usage"]["completion_tokens"] == 32
            done.append(response.status_code)

    with trio.fail_after(10):
        async with demo(config) as client, trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(client_loop, client, i % 2 == 0)
    assert done == [200] * 160


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="model_names"):
        DemoConfig(model_names=())
    with pytest.raises(ValueError, match="default_output_tokens"):
        DemoConfig(default_output_tokens=0)


def test_the_command_line_rejects_a_bad_gpu_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--max-batch", "0"])
    assert "max_batch" in capsys.readouterr().err


def test_reconfigure_changes_the_pace_from_now_on() -> None:
    model = GpuModel(GpuConfig(max_batch=1, decode_base_s=0.01, decode_per_seq_s=0))
    a = model.submit(1, 0, 10, now=0)
    b = model.submit(2, 0, 10, now=0)
    assert a and b and model.waiting == 1
    model.reconfigure(GpuConfig(max_batch=2, decode_base_s=0.02, decode_per_seq_s=0), now=0.05)
    assert model.waiting == 0 and b.started_at == 0.05
    assert model.tokens_done(a, now=0.05) == 5
    assert [s.id for s in model.advance(10)] == [1, 2]
    assert a.finished_at == pytest.approx(0.05 + 5 * 0.02)
    assert b.finished_at == pytest.approx(0.05 + 10 * 0.02)


async def test_engine_hands_out_tokens_exactly_when_due(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = DemoEngine(GpuConfig(max_batch=2, decode_base_s=0.01, decode_per_seq_s=0.01))
    arrivals: dict[int, list[tuple[float, int]]] = {1: [], 2: []}

    async def follow(ticket_no: int, prompt_tokens: int, output_tokens: int) -> None:
        ticket = engine.submit(prompt_tokens, output_tokens, streaming=True)
        seen = 0
        while seen < output_tokens:
            await ticket.wait_tokens_beyond(seen)
            seen = ticket.tokens_ready
            arrivals[ticket_no].append((trio.current_time(), seen))
        assert ticket.state is TicketState.FINISHED

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        start = trio.current_time()
        async with trio.open_nursery() as clients:
            clients.start_soon(follow, 1, 0, 3)
            await trio.sleep(0.025)  # 1 token of the first is out when the second joins
            clients.start_soon(follow, 2, 512, 2)
        nursery.cancel_scope.cancel()
    # Alone a step takes 20 ms, together 30 ms. The second joins at step 1.25; its prefill of
    # 512 tokens takes one step, so its tokens fall at steps 3.25 and 4.25 (the first has
    # ended at step 3 by then, so the last step is 20 ms again).
    assert [(round(t - start, 6), n) for t, n in arrivals[1]] == [
        (0.02, 1),
        (0.0475, 2),
        (0.0775, 3),
    ]
    assert [(round(t - start, 6), n) for t, n in arrivals[2]] == [(0.0825, 1), (0.1025, 2)]


async def test_engine_refuses_and_cancels(autojump_clock: trio.testing.MockClock) -> None:
    engine = DemoEngine(GpuConfig(max_batch=1, max_waiting=1, kv_capacity_tokens=100))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        first = engine.submit(10, 50, streaming=False)
        second = engine.submit(10, 50, streaming=False)
        third = engine.submit(10, 50, streaming=False)
        too_long = engine.submit(60, 50, streaming=False)
        for ticket in (first, second, third, too_long):
            await ticket.wait_decided()
        assert (third.refusal, too_long.refusal) == (Refusal.WAITING_ROOM_FULL, Refusal.TOO_LONG)
        assert third.retry_after_s > 0
        assert (engine.statistics().running, engine.statistics().waiting) == (1, 1)
        engine.cancel(first)
        await first.wait_ended()
        assert first.state is TicketState.CANCELLED
        assert (engine.statistics().running, engine.statistics().waiting) == (1, 0)
        await second.wait_ended()
        assert second.state is TicketState.FINISHED
        nursery.cancel_scope.cancel()
