"""Tracing: a server span with queue events, a client span whose trace reaches the backend."""

from __future__ import annotations

import httpx2
import pytest
import trio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.conftest import gateway_settings, start_demo, start_gateway

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
