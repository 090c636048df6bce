"""Carrying one admitted request to a backend pool and its answer back.

Why the stream is an async generator primed before it is returned: the upstream call (and
the admission ticket) must be released whatever the client does. A generator that has
started is closed by trio's finaliser even if the web framework never iterates it again, so
the handler starts it (it opens the upstream call and yields the status) before handing it
to the response. `on_end` is called exactly once per call, whatever happened, with what the
controller and the quota need to learn from it.

Why a stream's bounds are set per read: a cancel scope must not stay open across a `yield`
(the consumer's code would run inside it), so each read from the backend gets the stream's
absolute deadline instead: `first_byte_timeout_s` until its first body byte, then
`timeout_s` for the whole. A deadline that passes after the head was sent ends the client's
stream with an SSE error event; before, it is a plain 504.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractContextManager, AsyncExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import trio
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from backends.http.client import (
    REFUSED_CREDENTIALS,
    BackendDeadline,
    BackendError,
    BackendTimeout,
    BackendTooLarge,
    BackendUnavailable,
)
from scheduler.core import Outcome
from scheduler.core.backend import Backend, BackendResponse
from scheduler.openai.errors import NO_RETRY, ApiError, openai_error_body
from scheduler.service.metrics import BackendErrorKind, backend_error_kind
from scheduler.service.refusals import backend_saturated, backend_unavailable
from scheduler.service.tracing import tracer, tracing_on

SATURATED = frozenset({429, 503})
USAGE_TAIL_BYTES = 16384  # a stream's last bytes kept for its usage event


@dataclass(frozen=True, slots=True)
class Reply:
    """A response ready to send: a whole body, or a primed stream."""

    status: int
    headers: dict[str, str]
    body: bytes | AsyncGenerator[bytes, None]


@dataclass(frozen=True, slots=True)
class Ended:
    """How one backend call ended."""

    outcome: Outcome
    latency_s: float
    ttft_s: float | None
    output_tokens: int
    total_tokens: int | None  # from the response's usage, when it said
    status: int = 0
    body: bytes = b""  # a whole 2xx body (a stream's events, when kept), for the cache
    error: BackendErrorKind | None = None
    # the client went away (cancelled, or stopped reading the stream) after the call was sent:
    # the backend worked on it, unlike a call the backends failed
    abandoned: bool = False


OnEnd = Callable[[Ended], None]
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/responses": "chat",  # OTel's gen_ai.operation.name has no value of its own for it
    "/v1/embeddings": "embeddings",
}


@dataclass(frozen=True, slots=True)
class Target:
    """Where a call goes: the pool, the path, and the model named in the body."""

    pool: Backend
    path: str
    model: str
    timeout_s: float  # the whole call, a stream's last byte included
    keep_bytes: int = 0  # a stream's events are kept up to this size, for the cache
    first_byte_timeout_s: float = math.inf  # a stream's first body byte (within timeout_s)

    def first_byte_at(self, started_at: float) -> float:
        return started_at + min(self.timeout_s, self.first_byte_timeout_s)


def _client_span(target: Target, prompt_tokens: int) -> trace.Span | None:
    """The backend call's span, or None when tracing is off."""
    if not tracing_on():
        return None
    operation = OPERATIONS.get(target.path, "chat")
    return tracer().start_span(
        f"{operation} {target.model}",
        kind=SpanKind.CLIENT,
        attributes={
            "gen_ai.operation.name": operation,
            "gen_ai.system": "openai",
            "gen_ai.request.model": target.model,
            "gen_ai.usage.input_tokens": prompt_tokens,
        },
    )


def _current(span: trace.Span | None) -> AbstractContextManager[object]:
    """`span` made current (so `traceparent` carries it to the backend), when there is one."""
    return nullcontext() if span is None else trace.use_span(span, end_on_exit=False)


def _end_span(span: trace.Span | None, ended: Ended) -> None:
    if span is None:
        return
    span.set_attribute("http.response.status_code", ended.status)
    span.set_attribute("gen_ai.usage.output_tokens", ended.output_tokens)
    span.set_attribute("scheduler.outcome", ended.outcome.value)
    if ended.ttft_s is not None:
        span.set_attribute("scheduler.ttft_s", ended.ttft_s)
    span.end()


async def call_whole(
    target: Target, raw: bytes, headers: dict[str, str], prompt_tokens: int, on_end: OnEnd
) -> Reply:
    started_at = trio.current_time()
    outcome, status, body = Outcome.IGNORED, 0, b""
    usage: tuple[int, int | None] = (0, None)
    failed: BackendErrorKind | None = None
    abandoned = False
    span = _client_span(target, prompt_tokens)
    try:
        # `timeout_s` bounds the whole call, not each read: a backend dripping bytes is late too
        whole_at = started_at + target.timeout_s
        with _current(span), _Deadline(whole_at, WHOLE_LATE):
            async with target.pool.post(
                target.path, raw, headers, timeout_s=target.timeout_s
            ) as up:
                body = await up.read()
                status = up.status_code
                outcome, error = judge(up, target.model)
                if error is not None:
                    failed = backend_error_kind(status=status)
                    raise error
                usage = _usage(body)
                if status >= 400:
                    return Reply(status, *_passed_on(up, body))
                return Reply(status, up.end_to_end_headers(), body)
    except BackendError as exc:
        failed = backend_error_kind(exc)
        if isinstance(exc, BackendTimeout | BackendUnavailable):
            outcome = Outcome.DROPPED
        raise backend_error(exc, target.model) from exc
    except trio.Cancelled:  # the client went away while the backend worked on its request
        abandoned = True
        raise
    finally:
        latency = trio.current_time() - started_at
        ok_body = body if 200 <= status < 300 else b""
        ended = Ended(
            outcome, latency, None, usage[0], usage[1], status, ok_body, failed, abandoned
        )
        _end_span(span, ended)
        on_end(ended)


async def call_stream(
    target: Target, raw: bytes, headers: dict[str, str], prompt_tokens: int, on_end: OnEnd
) -> Reply:
    head: list[tuple[int, dict[str, str]]] = []  # the upstream's status and headers
    chunks = _stream_chunks(target, raw, headers, prompt_tokens, on_end, head)
    await chunks.__anext__()  # opens the upstream call; see the module docstring
    status, upstream_headers = head[0]
    return Reply(status, upstream_headers, chunks)


async def _stream_chunks(
    target: Target,
    raw: bytes,
    headers: dict[str, str],
    prompt_tokens: int,
    on_end: OnEnd,
    head: list[tuple[int, dict[str, str]]],
) -> AsyncGenerator[bytes, None]:
    """The call, primed by its first (empty) chunk once `head` holds the upstream's status
    and headers; then the body's chunks."""
    started_at = trio.current_time()
    outcome, ttft, events, status = Outcome.IGNORED, math.nan, 0, 0
    failed: BackendErrorKind | None = None
    kept: list[bytes] | None = [] if target.keep_bytes else None
    kept_bytes = 0
    # the stream's last pieces, for the usage its last events report (read once, at the end:
    # an event may come in several reads)
    tail: deque[bytes] = deque()
    tail_bytes = 0
    abandoned = head_sent = False
    span = _client_span(target, prompt_tokens)
    try:
        async with AsyncExitStack() as stack:
            # current only while the request is sent (traceparent), never across a yield
            deadline = _Deadline(target.first_byte_at(started_at), FIRST_BYTE_LATE)
            with _current(span), deadline:
                up = await stack.enter_async_context(
                    target.pool.post(target.path, raw, headers, timeout_s=target.timeout_s)
                )
            status = up.status_code
            outcome, error = judge(up, target.model)
            if error is not None:
                failed = backend_error_kind(status=status)
                with _Deadline(started_at + target.timeout_s, WHOLE_LATE):
                    await up.read()
                raise error
            outcome = Outcome.IGNORED  # until the stream ends well
            if status >= 400:  # no stream, an error: whole
                with _Deadline(started_at + target.timeout_s, WHOLE_LATE):
                    error_headers, error_body = _passed_on(up, await up.read())
                head.append((status, error_headers))
                yield b""
                head_sent = True
                yield error_body
                return
            head.append((up.status_code, up.end_to_end_headers()))
            yield b""  # primed: `call_stream` reads the head
            head_sent = True
            pieces = up.chunks()
            while chunk := await _next_chunk(up, pieces, target, started_at, math.isnan(ttft)):
                if math.isnan(ttft):
                    ttft = trio.current_time() - started_at
                events += chunk.count(b"data:")
                tail.append(chunk)
                tail_bytes += len(chunk)
                while tail_bytes - len(tail[0]) >= USAGE_TAIL_BYTES:
                    tail_bytes -= len(tail.popleft())
                if kept is not None:
                    kept_bytes += len(chunk)
                    if kept_bytes <= target.keep_bytes:
                        kept.append(chunk)
                    else:
                        kept = None  # too long to cache
                yield chunk
            outcome = Outcome.COMPLETED
    except BackendError as exc:
        failed = backend_error_kind(exc)
        if isinstance(exc, BackendTimeout | BackendUnavailable):
            outcome = Outcome.DROPPED
        if not head_sent:
            raise backend_error(exc, target.model) from exc
        # the headers are gone already: end the stream with an SSE error event
        yield b"data: " + backend_error(exc, target.model).body() + b"\n\n"
    except (trio.Cancelled, GeneratorExit):  # the client left: closed or stopped reading
        abandoned = outcome is not Outcome.COMPLETED
        raise
    finally:
        latency = trio.current_time() - started_at
        first = None if math.isnan(ttft) else ttft
        reported, total = _stream_usage(b"".join(tail)) if tail else (None, None)
        whole = outcome is Outcome.COMPLETED and 200 <= status < 300
        body = b"".join(kept) if whole and kept is not None else b""
        # the output its usage reports; else its events, less the closing `[DONE]` (a
        # Responses stream's non-text events would count too, but it always reports usage)
        output = max(0, events - 1) if reported is None else reported
        ended = Ended(outcome, latency, first, output, total, status, body, failed, abandoned)
        _end_span(span, ended)
        on_end(ended)


async def _next_chunk(
    up: BackendResponse,
    pieces: AsyncIterator[bytes],
    target: Target,
    started_at: float,
    before_first_byte: bool,
) -> bytes:
    """The stream's next body chunk (b"" at its end), by the stream's deadline: the first
    byte's until one came, then the whole stream's (`deadline_at`: the client's read is
    bounded by it, no scope of our own per chunk)."""
    if before_first_byte:
        up.deadline_at, late = target.first_byte_at(started_at), FIRST_BYTE_LATE
    else:
        up.deadline_at, late = started_at + target.timeout_s, WHOLE_LATE
    try:
        async for chunk in pieces:
            if chunk:
                return chunk
    except BackendDeadline as exc:
        raise DeadlinePassed(late) from exc
    return b""


class DeadlinePassed(BackendTimeout):
    """One of the request's own bounds ran out; the message is written for the client."""


# a route the backend does not serve (llama-server's /v1/embeddings without --embeddings):
# a fact about the request, told in the backend's words, not a failure of the backend
NOT_IMPLEMENTED = 501
WHOLE_LATE = "The backend did not finish its answer within server.request_timeout_s."
FIRST_BYTE_LATE = "The backend sent no first byte within server.first_byte_timeout_s."


class _Deadline:
    """An absolute deadline on a backend call; running out is the backend's timeout (a plain
    cancel scope: `trio.fail_at` and a generator-based context manager around it cost a
    request microseconds more)."""

    __slots__ = ("_message", "_scope")

    def __init__(self, deadline_at: float, message: str) -> None:
        self._scope = trio.CancelScope(deadline=deadline_at)
        self._message = message

    def __enter__(self) -> None:
        self._scope.__enter__()

    def __exit__(self, *exc_info: Any) -> None:
        self._scope.__exit__(*exc_info)  # swallows only its own cancellation, told as such:
        if self._scope.cancelled_caught:
            raise DeadlinePassed(self._message)


def judge(up: BackendResponse, model: str) -> tuple[Outcome, ApiError | None]:
    """How a backend status counts for the controller, and what the client gets instead."""
    status = up.status_code
    if status < 400:
        return Outcome.COMPLETED, None
    if status in SATURATED:
        retry_after = next((v for k, v in up.headers if k == b"retry-after"), None)
        text = None if retry_after is None else retry_after.decode("latin-1")
        return Outcome.DROPPED, backend_saturated(model, status, text)
    if status in REFUSED_CREDENTIALS:  # the client's key was good: the gateway's was not
        message = (
            f"The backend refused the gateway's credentials (status {status}); its key is "
            f"models.{model}.api_key_env."
        )
        return Outcome.IGNORED, ApiError(502, message, type="server_error", code="backend_auth")
    if status < 500 or status == NOT_IMPLEMENTED:
        return Outcome.IGNORED, None  # the backend's own 4xx or 501 is passed on (`_passed_on`)
    message = f"The backend failed with status {status}."
    return Outcome.IGNORED, ApiError(502, message, type="server_error", code="bad_gateway")


def _passed_on(up: BackendResponse, body: bytes) -> tuple[dict[str, str], bytes]:
    """The headers and body of the backend's own 4xx or 501 (what `judge` passes on), the
    body in OpenAI's shape."""
    headers = up.end_to_end_headers()
    headers["content-type"] = "application/json"
    if up.status_code == NOT_IMPLEMENTED:  # the route is not served: asking again is futile
        headers.update(NO_RETRY)
    return headers, openai_error_body(up.status_code, body)


def backend_error(exc: BackendError, model: str) -> ApiError:
    if isinstance(exc, BackendTimeout):
        message = (
            str(exc) if isinstance(exc, DeadlinePassed) else "The backend did not answer in time."
        )
        return ApiError(504, message, type="server_error", code="timeout")
    if isinstance(exc, BackendUnavailable):
        return backend_unavailable(model)
    message = "The backend's response broke off."
    if isinstance(exc, BackendTooLarge):
        message = "The backend's answer is larger than backend_limits.max_response_bytes."
    return ApiError(502, message, type="server_error", code="bad_gateway")


def _usage(body: bytes) -> tuple[int, int | None]:
    """(completion tokens, total tokens or None) from a whole response's `usage`
    (`output_tokens` in the Responses API)."""
    try:
        usage = json.loads(body).get("usage") or {}
        total = usage.get("total_tokens")
        output = usage.get("completion_tokens") or usage.get("output_tokens") or 0
        return int(output), None if total is None else int(total)
    except (ValueError, AttributeError, TypeError):
        return 0, None


def _stream_usage(tail: bytes) -> tuple[int | None, int | None]:
    """(output tokens, total tokens) of the `usage` of the last event in a stream's `tail`
    that reports it (OpenAI's last chunk before `[DONE]`; others report it in every chunk,
    or as null; the Responses API in `response.completed`, after the whole answer, so the
    object is read where it stands, not from its line's start). A `"usage"` inside
    generated text is escaped in JSON (`\\"usage\\"`), so every match is a key."""
    end, decode = len(tail), json.JSONDecoder().raw_decode
    text = tail.decode("utf-8", "replace")
    while (at := text.rfind('"usage"', 0, end)) >= 0:
        end = at
        colon = text.find(":", at + 7)
        if colon < 0 or text[at + 7 : colon].strip():
            continue
        value_at = colon + 1
        while value_at < len(text) and text[value_at] in " \t\r\n":
            value_at += 1
        try:
            usage, _ = decode(text, value_at)
            if isinstance(usage, dict) and usage.get("total_tokens") is not None:
                output = usage.get("completion_tokens", usage.get("output_tokens"))
                return None if output is None else int(output), int(usage["total_tokens"])
        except (ValueError, TypeError):
            continue
    return None, None
