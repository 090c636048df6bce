"""The HTTP surface on quart-trio: OpenAI-compatible routes, health, readiness, OpenAPI.

Every error leaves as OpenAI-shaped JSON: the handlers raise `ApiError`, and the framework's
own errors (404, 405, 413) and anything unexpected are translated by the handlers below, so
no client ever sees an HTML page or a traceback.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from scheduler.service.admin import create_admin
from scheduler.service.errors import ApiError
from scheduler.service.openai_body import read_call
from scheduler.service.openapi import openapi_document
from scheduler.service.replica import Replica
from scheduler.service.tracing import tracer
from scheduler.service.upstream import Reply

log = logging.getLogger("scheduler.service")


def _error_response(error: ApiError) -> Response:
    return Response(error.body(), status=error.status, headers=error.headers())


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


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json")


def create_app(replica: Replica) -> QuartTrio:
    """The quart-trio app for one replica."""
    app = QuartTrio("scheduler")
    settings = replica.settings
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # streams last as long as the backend takes
    app.config["BODY_TIMEOUT"] = 60
    created = int(time.time())

    @app.before_serving
    async def start() -> None:
        await replica.start(app.nursery)

    @app.after_serving
    async def stop() -> None:
        await replica.stop()

    async def inference(route: str) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        span = tracer().start_span(
            f"{request.method} {request.path}",
            context=propagate.extract(headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.path},
        )
        try:
            with trace.use_span(span, record_exception=False):
                reply = await answer(route, headers, span)
        except BaseException as exc:
            if isinstance(exc, ApiError):
                span.set_attribute("http.response.status_code", exc.status)
                span.set_attribute("error.type", exc.code or exc.type)
            span.end()
            raise
        span.set_attribute("http.response.status_code", reply.status)
        if isinstance(reply.body, bytes):
            span.end()
            return Response(reply.body, status=reply.status, headers=reply.headers)
        # a stream: the span lasts until its last byte is sent (or the client goes away)
        response = Response(_ending(span, reply.body), status=reply.status, headers=reply.headers)
        response.timeout = None
        return response

    async def answer(route: str, headers: dict[str, str], span: trace.Span) -> Reply:
        gateway = replica.gateway
        # the body first: answering before it is read would leave it in the connection
        raw = await request.get_data(cache=False, as_text=False)
        assert isinstance(raw, bytes)
        key = await gateway.authenticate(headers.get("authorization"))
        span.set_attribute("scheduler.tier", key.tier)
        call = read_call(route, raw, default_max_tokens=settings.server.default_max_tokens)
        span.set_attribute("gen_ai.request.model", call.model)
        span.set_attribute("scheduler.stream", call.stream)
        return await gateway.serve(key, call, raw, headers)

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        return await inference("chat")

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await inference("completions")

    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        return await inference("embeddings")

    @app.get("/v1/models")
    async def models() -> Response:
        await replica.gateway.authenticate(request.headers.get("authorization"))
        data = [
            {"id": m.name, "object": "model", "created": created, "owned_by": "scheduler"}
            for m in settings.models
        ]
        return _json({"object": "list", "data": data})

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = replica.metrics.render()
        return Response(body, status=200, content_type=content_type)

    @app.get("/readyz")
    async def readyz() -> Response:
        checks = await replica.readiness()
        ready = all(bool(v.get("ok")) for v in checks.values())
        return _json({"ready": ready, "checks": checks}, 200 if ready else 503)

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return _json(openapi_document(settings))

    app.register_blueprint(create_admin(replica))

    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> Response:
        return _error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        messages = {
            404: f"Unknown route: {request.method} {request.path}",
            405: f"Method {request.method} is not allowed on {request.path}.",
            413: f"The request body is larger than {settings.server.max_body_bytes} bytes.",
        }
        message = messages.get(status, error.description or error.name)
        kind = "invalid_request_error" if status < 500 else "server_error"
        response = _error_response(ApiError(status, message, type=kind))
        if status == 413:  # the rest of the body was not read: this connection is done
            response.headers["Connection"] = "close"
        if status == 405 and error.get_response().headers.get("Allow"):
            response.headers["Allow"] = error.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error_response(ApiError(500, "Internal error.", type="server_error"))

    return app
