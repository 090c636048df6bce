"""A real OTLP/HTTP trace receiver for tests: `POST /v1/traces` on a free loopback port.

It decodes each body as the protobuf `ExportTraceServiceRequest` (the `opentelemetry-proto`
package's generated classes, as a collector would), gunzips it when the exporter compressed
it, keeps every span, and answers with an `ExportTraceServiceResponse`. A threaded server
from the standard library: the exporter under test lives in another process, so the receiver
needs no event loop of the test's, and a trio test waits on it with `trio.to_thread`.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

MAX_BODY_BYTES = 16 * 1024 * 1024
PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One exported span, ids in the hex of `traceparent`."""

    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    kind: int  # Span.SpanKind: SPAN_KIND_SERVER, SPAN_KIND_CLIENT, ...
    attributes: dict[str, Any]
    service_name: str
    events: tuple[str, ...] = field(default=())


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, which) if which else None


def _attributes(pairs: Iterator[KeyValue] | Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


def decode_spans(body: bytes) -> list[ReceivedSpan]:
    """Every span of one `ExportTraceServiceRequest` body."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        service = _attributes(resource_spans.resource.attributes).get("service.name", "")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(_received(span, service))
    return spans


def _received(span: Span, service: str) -> ReceivedSpan:
    return ReceivedSpan(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        name=span.name,
        kind=span.kind,
        attributes=_attributes(span.attributes),
        service_name=str(service),
        events=tuple(e.name for e in span.events),
    )


class OtlpReceiver:
    """The spans received so far, and a way to wait for the ones a test expects."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self.requests = 0
        self.rejected: list[str] = []  # why a request was refused (a test should see none)

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self.requests += 1
            self._spans.extend(spans)
            self._changed.notify_all()

    def reject(self, reason: str) -> None:
        with self._changed:
            self.rejected.append(reason)

    def wait_for(
        self, found: Callable[[list[ReceivedSpan]], bool], timeout_s: float
    ) -> list[ReceivedSpan]:
        """Block until `found(spans)` holds (returns the spans) or `timeout_s` passes (raises
        `TimeoutError` showing what did arrive). Blocking: run it in a thread from trio."""
        deadline_at = time.monotonic() + timeout_s
        with self._changed:
            while not found(self._spans):
                left_s = deadline_at - time.monotonic()
                if left_s <= 0:
                    names = [(s.name, s.kind, s.trace_id) for s in self._spans]
                    raise TimeoutError(f"spans not received in {timeout_s} s; got {names}")
                self._changed.wait(left_s)
            return list(self._spans)


def _handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != "/v1/traces":
                return self._answer(404, b"", "text/plain")
            length = int(self.headers.get("content-length") or 0)
            if not 0 <= length <= MAX_BODY_BYTES:
                return self._refuse(413, f"body of {length} bytes")
            body = self.rfile.read(length)
            try:
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                spans = decode_spans(body)
            except (DecodeError, OSError, EOFError) as exc:
                return self._refuse(400, f"undecodable export request: {exc!r}")
            receiver.add(spans)
            self._answer(200, ExportTraceServiceResponse().SerializeToString(), PROTOBUF)

        def _refuse(self, status: int, reason: str) -> None:
            receiver.reject(reason)
            self._answer(status, reason.encode(), "text/plain")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the test reports what it received

    return Handler


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, OtlpReceiver]]:
    """Serve a receiver on 127.0.0.1 (a free port); yields its base URL (what
    `OTEL_EXPORTER_OTLP_ENDPOINT` takes) and the receiver."""
    receiver = OtlpReceiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(receiver))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
