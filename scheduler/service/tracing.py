"""OpenTelemetry: a server span per request, a client span per backend call.

Exporters come from the standard `OTEL_*` variables: `OTEL_TRACES_EXPORTER=otlp` (or an
`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) sends spans over
OTLP/HTTP, `console` prints them, and with none of these nothing is set up: the API's no-op
tracer costs next to nothing. Tests install their own provider (an in-memory exporter).

The backend call's span is current while the request is sent, so `traceparent` carries its
trace to the backend (`backends.http` injects the context itself: no instrumentor covers
our HTTP client).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import trace

TRACER_NAME = "scheduler.gateway"


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def configure_from_env(env: Mapping[str, str] | None = None) -> str:
    """Install a tracer provider as the OTEL_* variables ask; returns what was chosen."""
    env = os.environ if env is None else env
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if (exporter in ("", "none") and not endpoint) or exporter == "none":
        return "none"
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    span_exporter: SpanExporter
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter()
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "scheduler")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    return exporter or "otlp"
