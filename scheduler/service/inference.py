"""The inference routes as a bare ASGI app; every other route goes on to quart-trio.

Why not quart-trio for these too: a quart-trio request costs about 185 us of CPU before the
handler runs (request and app contexts, werkzeug's header and body objects, a task per
request and one per response), which was a fifth of the gateway's time per request, and the
inference routes need none of it: one path each, one method, a JSON body read whole, and an
answer that is bytes or a stream (`Reply`). The admin API and the operational routes keep
quart-trio (routing, path parameters, blueprints); `POST` on an inference path is served here,
any other method gets 405 (`Allow: POST`).

What the framework did for these routes is done here, in the same terms:
- the body is read whole first, at most `server.max_body_bytes` (a larger one: 413 and the
  connection closed, the rest unread), within `BODY_TIMEOUT_S` (else 408, closed);
- `Content-Length` with `Transfer-Encoding` is refused (400, closed), as RFC 9112 asks;
- a client that goes away (hypercorn's `http.disconnect`, told through `http1.ON_DISCONNECT`)
  cancels the answer at once, its queue seat and its backend call with it;
- every error leaves as OpenAI-shaped JSON: an `ApiError` as itself, anything else as a
  logged 500, never a traceback;
- the last send of an answer is shielded: for an answer that closes its connection,
  hypercorn closes the socket from inside that send and reports the client gone, which must
  not cancel the close itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator
from contextlib import aclosing

import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    HTTPScope,
    Scope,
)
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from scheduler.openai.body import read_call
from scheduler.openai.errors import ApiError
from scheduler.service.http1 import ON_DISCONNECT, next_message
from scheduler.service.replica import Replica
from scheduler.service.tracing import tracer, tracing_on
from scheduler.service.upstream import Reply

log = logging.getLogger("scheduler.service")

ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
    "/v1/embeddings": "embeddings",
}
BODY_TIMEOUT_S = 60.0  # the whole body, from the request's head on


class _Gone(Exception):
    """The client went away before its request's body was read."""


class InferenceApp:
    """`POST` on the inference paths, answered here; everything else passed to `app`."""

    def __init__(self, replica: Replica, app: ASGIFramework) -> None:
        self._replica = replica
        self._app = app
        self._max_body_bytes = replica.settings.server.max_body_bytes

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "http":
            route = ROUTES.get(scope["path"])
            if route is not None:
                await self._serve(route, scope, receive, send)
                return
        await self._app(scope, receive, send)

    async def _serve(
        self, route: str, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        # one cancel scope for the request: the body's deadline, then the client's going away
        # (told by hypercorn, `http1.ON_DISCONNECT`: no task of our own waits for it)
        with trio.CancelScope(deadline=trio.current_time() + BODY_TIMEOUT_S) as request:
            scope["extensions"][ON_DISCONNECT] = request.cancel  # type: ignore[assignment]
            try:
                # read first, so that the connection can carry the next request whatever
                # the answer
                raw = await self._body(headers, receive)
            except _Gone:
                return
            except ApiError as error:
                await _send_error(send, error)
                return
            request.deadline = math.inf
            if scope["method"] != "POST":
                method, path = scope["method"], scope["path"]
                refusal = ApiError(405, f"Method {method} is not allowed on {path}.")
                refusal.extra_headers["allow"] = "POST"
                await _send_error(send, refusal)
                return
            await self._answer(route, scope, headers, raw, send)
        if request.cancelled_caught and trio.current_time() >= request.deadline:  # not gone
            message = f"The request body was not received within {BODY_TIMEOUT_S:g} s."
            await _send_error(send, _closing(ApiError(408, message)))

    async def _body(self, headers: dict[str, str], receive: ASGIReceiveCallable) -> bytes:
        """The request's whole body; raises the ApiError that refuses it."""
        if "content-length" in headers and "transfer-encoding" in headers:
            raise ambiguous_framing()
        limit = self._max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise body_too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await next_message(receive)
            if event["type"] != "http.request":
                raise _Gone  # http.disconnect
            body = event.get("body", b"")
            size += len(body)
            if size > limit:
                raise body_too_large(limit)
            chunks.append(body)
            if not event.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _answer(
        self,
        route: str,
        scope: HTTPScope,
        headers: dict[str, str],
        raw: bytes,
        send: ASGISendCallable,
    ) -> None:
        """One request's answer, under its server span when tracing is on; a stream's span ends
        with its last byte."""
        span: trace.Span | None = None
        if tracing_on():
            method, path = scope["method"], scope["path"]
            span = tracer().start_span(
                f"{method} {path}",
                context=propagate.extract(headers),
                kind=SpanKind.SERVER,
                attributes={"http.request.method": method, "url.path": path},
            )
        try:
            if span is None:
                reply = await self._reply(route, headers, raw, None)
            else:
                with trace.use_span(span, record_exception=False):
                    reply = await self._reply(route, headers, raw, span)
        except BaseException as exc:
            if span is not None:
                if isinstance(exc, ApiError):
                    span.set_attribute("http.response.status_code", exc.status)
                    span.set_attribute("error.type", exc.code or exc.type)
                span.end()
            if isinstance(exc, ApiError):
                await _send_error(send, exc)
            elif isinstance(exc, Exception):
                log.exception("unexpected error on POST %s", scope["path"])
                await _send_error(send, ApiError(500, "Internal error.", type="server_error"))
            else:
                raise
            return
        body = reply.body
        if span is not None:
            span.set_attribute("http.response.status_code", reply.status)
            if isinstance(body, bytes):
                span.end()
            else:
                body = _ending(span, body)
        if isinstance(body, bytes):
            await _send_whole(send, reply.status, reply.headers, body)
        else:
            await _send_stream(send, reply.status, reply.headers, body)

    async def _reply(
        self, route: str, headers: dict[str, str], raw: bytes, span: trace.Span | None
    ) -> Reply:
        gateway = self._replica.gateway
        key = await gateway.authenticate(headers.get("authorization"))
        default_max_tokens = self._replica.settings.server.default_max_tokens
        call = read_call(route, raw, default_max_tokens=default_max_tokens)
        if span is not None:
            span.set_attribute("scheduler.tier", key.tier)
            span.set_attribute("gen_ai.request.model", call.model)
            span.set_attribute("scheduler.stream", call.stream)
        return await gateway.serve(key, call, raw, headers)


def _closing(error: ApiError) -> ApiError:
    error.extra_headers["connection"] = "close"
    return error


def ambiguous_framing() -> ApiError:
    """Content-Length and Transfer-Encoding both: the body's end is ambiguous (request
    smuggling's trick), so RFC 9112 has the connection closed (both apps refuse it so)."""
    message = "Content-Length and Transfer-Encoding must not both be sent."
    return _closing(ApiError(400, message))


def body_too_large(limit: int) -> ApiError:
    """A body over `server.max_body_bytes`: refused unread, the connection closed."""
    return _closing(ApiError(413, f"The request body is larger than {limit} bytes."))


def _head(status: int, headers: dict[str, str], length: int | None) -> ASGISendEvent:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    if length is not None:
        raw.append((b"content-length", str(length).encode()))
    return {"type": "http.response.start", "status": status, "headers": raw, "trailers": False}


async def _send_whole(
    send: ASGISendCallable, status: int, headers: dict[str, str], body: bytes
) -> None:
    await send(_head(status, headers, len(body)))
    with trio.CancelScope(shield=True):
        await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send: ASGISendCallable, error: ApiError) -> None:
    await _send_whole(send, error.status, error.headers(), error.body())


async def _ending(
    span: trace.Span, body: AsyncGenerator[bytes, None]
) -> AsyncGenerator[bytes, None]:
    """`body`, then the end of the server span; closing this closes `body` at once (the
    upstream call and the admission ticket with it)."""
    try:
        async with aclosing(body):
            async for chunk in body:
                yield chunk
    finally:
        span.end()


async def _send_stream(
    send: ASGISendCallable,
    status: int,
    headers: dict[str, str],
    chunks: AsyncGenerator[bytes, None],
) -> None:
    """A stream, chunk by chunk; closing it (the client gone) closes the upstream call."""
    async with aclosing(chunks):
        await send(_head(status, headers, None))
        async for chunk in chunks:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
    with trio.CancelScope(shield=True):
        await send({"type": "http.response.body", "body": b"", "more_body": False})
