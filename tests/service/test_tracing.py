"""Tracing: a server span with queue events, a client span whose trace reaches the backend."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
import trio
from opentelemetry import trace
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from backends.redis.embedded import free_port
from scheduler.service.tracing import exporters_from_env
from tests.conftest import gateway_settings, start_demo, start_gateway
from tests.service.test_cli import wait_ready
from tests.support.otlp_receiver import ReceivedSpan, otlp_receiver

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def in_memory_tracing() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)


@pytest.mark.parametrize("stream", [False, True])
async def test_one_request_one_trace_into_the_backend(
    nursery: trio.Nursery, redis_url: str, stream: bool
) -> None:
    EXPORTER.clear()
    demo = await start_demo(nursery)
    gateway = await start_gateway(nursery, gateway_settings(demo, redis_url))
    body = {"model": "demo-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    headers = {"authorization": "Bearer sk-demo-enterprise"}
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            r = await client.post(
                gateway + "/v1/chat/completions", json={**body, "stream": stream}, headers=headers
            )
            assert r.status_code == 200
            seen = (await client.get(demo + "/demo/traceparents")).json()
    spans = EXPORTER.get_finished_spans()
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    (client_span,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert server.name == "POST /v1/chat/completions"
    events = [e.name for e in server.events]
    assert events[:2] == ["queue.enter", "queue.admitted"]
    assert server.attributes is not None and server.attributes["scheduler.tier"] == "enterprise"
    assert client_span.context.trace_id == server.context.trace_id
    assert client_span.parent is not None and client_span.parent.span_id == server.context.span_id
    assert client_span.attributes is not None
    assert client_span.attributes["gen_ai.request.model"] == "demo-small"
    assert client_span.attributes["gen_ai.usage.output_tokens"] == 5 or stream
    # the server span covers the whole answer, a stream's last byte included
    assert server.end_time is not None and client_span.end_time is not None
    assert server.end_time >= client_span.end_time
    trace_hex = f"{server.context.trace_id:032x}"
    assert any(trace_hex in parent for parent in seen["traceparents"]), seen
    for span in spans:  # the key never reaches a trace
        assert "sk-demo" not in str(span.attributes) + str([e.attributes for e in span.events])


async def test_a_streamed_response_counts_the_output_its_usage_reports(
    nursery: trio.Nursery, redis_url: str
) -> None:
    # a Responses API stream has events that are not text (created, incomplete): its output
    # is what its usage says, not its events counted
    EXPORTER.clear()
    demo = await start_demo(nursery)
    gateway = await start_gateway(nursery, gateway_settings(demo, redis_url))
    body = {"model": "demo-small", "input": "hi", "max_output_tokens": 5, "stream": True}
    headers = {"authorization": "Bearer sk-demo-enterprise"}
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            r = await client.post(gateway + "/v1/responses", json=body, headers=headers)
            assert r.status_code == 200 and "event: response.incomplete" in r.text
    (client_span,) = [s for s in EXPORTER.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert client_span.attributes is not None
    assert client_span.attributes["gen_ai.usage.output_tokens"] == 5


async def test_a_client_traceparent_is_continued(nursery: trio.Nursery, redis_url: str) -> None:
    EXPORTER.clear()
    demo = await start_demo(nursery)
    gateway = await start_gateway(nursery, gateway_settings(demo, redis_url))
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    body = {"model": "demo-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    headers = {"authorization": "Bearer sk-demo-pro", "traceparent": parent}
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            r = await client.post(gateway + "/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200
    (server,) = [s for s in EXPORTER.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert f"{server.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.parametrize(
    ("env", "chosen"),
    [
        ({}, ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": " Console , otlp,console"}, ("console", "otlp")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, ()),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, ()),
        ({"OTEL_TRACES_EXPORTER": "zipkin,otlp"}, ("otlp",)),  # unknown: warned, skipped
    ],
)
def test_the_otel_variables_choose_the_exporters(
    env: dict[str, str], chosen: tuple[str, ...]
) -> None:
    assert exporters_from_env(env) == chosen


# -- `scheduler serve` exports over OTLP/HTTP, configured by the OTEL_* variables alone ----

SCHEDULER = str(Path(sys.executable).parent / "scheduler")
OTLP_KEY = "sk-otlp-test"
SPAN_WAIT_S = 15.0


def otlp_config(demo_url: str) -> str:
    return f"""
[tiers.test]
weight = 1
[[keys]]
key = "{OTLP_KEY}"
tenant = "otlp-test"
tier = "test"
[models.demo-small]
backends = ["{demo_url}"]
"""


def serve_env(endpoint: str, schedule_delay_ms: int) -> dict[str, str]:
    """The test's environment without SCHEDULER_* or OTEL_*, plus only standard OTEL_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCHEDULER_", "OTEL_"))}
    return {
        **env,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": "gateway-under-test",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": str(schedule_delay_ms),
    }


def one_trace(trace_id: str) -> Callable[[list[ReceivedSpan]], bool]:
    """Found: a server span and a client span in `trace_id`."""

    def found(spans: list[ReceivedSpan]) -> bool:
        kinds = {s.kind for s in spans if s.trace_id == trace_id}
        return {PbSpan.SPAN_KIND_SERVER, PbSpan.SPAN_KIND_CLIENT} <= kinds

    return found


def chat_trace_id(spans: list[ReceivedSpan]) -> str:
    servers = [
        s
        for s in spans
        if s.kind == PbSpan.SPAN_KIND_SERVER and s.name == "POST /v1/chat/completions"
    ]
    return servers[0].trace_id if servers else ""


def assert_one_trace_into_the_backend(spans: list[ReceivedSpan], traceparents: list[str]) -> None:
    trace_id = chat_trace_id(spans)
    mine = {s.span_id: s for s in spans if s.trace_id == trace_id}
    (server,) = [s for s in mine.values() if s.kind == PbSpan.SPAN_KIND_SERVER]
    (client,) = [s for s in mine.values() if s.kind == PbSpan.SPAN_KIND_CLIENT]
    assert server.service_name == client.service_name == "gateway-under-test"
    assert server.events[:2] == ("queue.enter", "queue.admitted")
    assert client.attributes["gen_ai.request.model"] == "demo-small"
    ancestor, hops = client.parent_span_id, 0
    while ancestor != server.span_id and ancestor in mine and hops < 10:
        ancestor, hops = mine[ancestor].parent_span_id, hops + 1
    assert ancestor == server.span_id, (client, server)
    # the backend got this trace, with the client span as the caller, sampled (flag bit 0)
    sent = [t for t in traceparents if t.startswith(f"00-{trace_id}-{client.span_id}-")]
    assert sent and int(sent[0][-2:], 16) & 1, (trace_id, client.span_id, traceparents)


@pytest.mark.parametrize(
    ("schedule_delay_ms", "workers"),
    [(100, 1), (100, 2), (60_000, 1)],
    ids=["live", "live-2-workers", "flushed-at-sigterm"],
)
async def test_scheduler_serve_exports_one_trace_over_otlp(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str, schedule_delay_ms: int, workers: int
) -> None:
    """With 100 ms batches the spans arrive while the gateway serves; with a minute's
    batch delay they can only arrive through the flush of a graceful shutdown (SIGTERM)."""
    live = schedule_delay_ms < 1000
    demo = await start_demo(nursery)
    config = tmp_path / "otlp.toml"
    config.write_text(otlp_config(demo))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [SCHEDULER, "serve", "--config", str(config), "--port", str(port)]
    command += ["--redis-url", redis_url, "--workers", str(workers)]
    with otlp_receiver() as (endpoint, receiver):
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=serve_env(endpoint, schedule_delay_ms),
        )
        try:
            with trio.fail_after(60):
                await trio.to_thread.run_sync(wait_ready, url, process)
                body = {"model": "demo-small", "messages": [{"role": "user", "content": "hi"}]}
                async with httpx2.AsyncClient(timeout=10) as client:
                    r = await client.post(
                        url + "/v1/chat/completions",
                        json={**body, "max_tokens": 3},
                        headers={"authorization": f"Bearer {OTLP_KEY}"},
                    )
                    assert r.status_code == 200, r.text
                    seen = (await client.get(demo + "/demo/traceparents")).json()
                if live:  # exported while serving, within a few batch delays
                    await trio.to_thread.run_sync(
                        receiver.wait_for, lambda s: one_trace(chat_trace_id(s))(s), SPAN_WAIT_S
                    )
                else:  # nothing is exported before the batch delay or a shutdown's flush
                    await trio.sleep(0.5)
                    assert not [s for s in receiver.spans if s.kind == PbSpan.SPAN_KIND_SERVER]
                process.send_signal(signal.SIGTERM)
                await trio.to_thread.run_sync(lambda: process.wait(30))
        finally:
            if process.poll() is None:
                process.kill()
            output, _ = process.communicate(timeout=10)
        assert process.returncode == 0, output
        spans = receiver.spans  # the process has exited: whatever it sent has arrived
        assert receiver.rejected == []
    assert one_trace(chat_trace_id(spans))(spans), (spans, output)
    assert_one_trace_into_the_backend(spans, seen["traceparents"])
