"""OpenTelemetry: a server span per request, a client span per backend call.

Exporters come from the standard `OTEL_*` variables, read when a replica starts serving
(`start_tracing`, called from `Replica.start`, so every worker process sets up its own):
`OTEL_TRACES_EXPORTER=otlp` (or just an `OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) sends spans over OTLP/HTTP (protobuf), `console` prints
them, a comma-separated list does both. With none of these (or `none`, or
`OTEL_SDK_DISABLED=true`) nothing is set up: the API's no-op tracer costs next to nothing.
Exporting only when asked is a deliberate departure from the spec's default of `otlp`: a
gateway started for a demo should not try to reach a collector on localhost:4318.

Everything else is the SDK's own reading of the environment, as the spec defines it:
`OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` (resource), `OTEL_TRACES_SAMPLER` and
`OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*` (the batch processor's delay and sizes),
`OTEL_EXPORTER_OTLP_*` (endpoint, headers, timeout, compression, certificate).

Spans are batched (`BatchSpanProcessor`, a thread of its own, so exporting never blocks the
trio loop); `flush_tracing` (called from `Replica.stop` on a graceful shutdown) exports what
is still batched, and the SDK shuts the provider down at interpreter exit.

Tests that inspect spans install their own provider (an in-memory exporter); a provider
already installed is never replaced.

The backend call's span is current while the request is sent, so `traceparent` carries its
trace to the backend (`backends.http.pool` injects the context itself: no instrumentor covers
our HTTP client).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)

TRACER_NAME = "scheduler.gateway"
DEFAULT_SERVICE_NAME = "scheduler"
EXPORTERS = frozenset({"otlp", "console"})
log = logging.getLogger("scheduler.service")

# the provider this process set up and its exporters, if any
_installed: tuple[TracerProvider, tuple[str, ...]] | None = None


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def tracing_on() -> bool:
    """Whether spans go anywhere: a provider is installed (ours, or a test's). Without one
    the request path makes no spans at all: even the API's no-op spans cost 30-50 us per
    request (context extraction, attribute dicts, context switches)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def exporters_from_env(env: Mapping[str, str]) -> tuple[str, ...]:
    """Which exporters the OTEL_* variables ask for: `()` for none (see the module doc)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    if "none" in names:
        return ()
    if not names and (
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    ):
        names = ["otlp"]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        log.warning("OTEL_TRACES_EXPORTER: ignoring %s (known: otlp, console)", unknown)
    return tuple(dict.fromkeys(n for n in names if n in EXPORTERS))


def _span_exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol != "http/protobuf":
        log.warning("OTLP protocol %r is not supported: exporting http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout: from the OTEL_* variables


def _resource() -> Resource:
    """OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES as the SDK reads them, else ours."""
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    return resource


def start_tracing(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Install a batching tracer provider as the OTEL_* variables ask, once per process.

    Returns the exporters in use (`()`: tracing stays the API's no-op). Calling it again,
    or with a provider already installed by someone else, changes nothing."""
    global _installed
    env = os.environ if env is None else env
    if _installed is not None:
        return _installed[1]
    names = exporters_from_env(env)
    if not names or not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return ()
    provider = TracerProvider(resource=_resource())  # the sampler: OTEL_TRACES_SAMPLER
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_span_exporter(name, env)))
    trace.set_tracer_provider(provider)
    _installed = (provider, names)
    log.info("tracing: exporting spans with %s", ", ".join(names))
    return names


def flush_tracing(timeout_s: float = 5.0) -> bool:
    """Export every span still batched (a graceful shutdown); False if it timed out.

    Blocking: call it from a thread (`trio.to_thread.run_sync`)."""
    if _installed is None:
        return True
    return _installed[0].force_flush(timeout_millis=int(timeout_s * 1000))
