"""The HTTP surface: OpenAI-compatible routes, health, readiness, OpenAPI, the admin API.

The inference routes are a bare ASGI app in front (`scheduler.service.inference`, which says
why); the rest is quart-trio.

Every error leaves as OpenAI-shaped JSON: the handlers raise `ApiError`, and the framework's
own errors (404, 405, 413) and anything unexpected are translated by the handlers below, so
no client ever sees an HTML page or a traceback.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import trio
from hypercorn.typing import ASGISendCallable, ASGISendEvent
from quart import Response, request
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from scheduler.openai.errors import ApiError
from scheduler.service import http1
from scheduler.service.admin import create_admin
from scheduler.service.inference import InferenceApp, ambiguous_framing, body_too_large
from scheduler.service.openapi import openapi_document
from scheduler.service.replica import Replica

log = logging.getLogger("scheduler.service")


class _ClosingConnection(TrioASGIHTTPConnection):
    """quart-trio's HTTP connection, with the last send of a response shielded.

    Why: for an answer that closes its connection (`Connection: close`), hypercorn closes the
    socket from inside that last send, after telling the app the client's side is done; the
    app then cancels its own tasks, the close among them, and the socket stays open: the
    client waits for an end that never comes."""

    async def handle_request(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Any, send: ASGISendCallable
    ) -> None:
        async def send_shielding_the_end(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await super().handle_request(nursery, request, send_shielding_the_end)


class _App(QuartTrio):
    asgi_http_class = _ClosingConnection


def _error_response(error: ApiError) -> Response:
    return Response(error.body(), status=error.status, headers=error.headers())


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json")


def create_app(replica: Replica) -> InferenceApp:
    """The ASGI app for one replica: the inference routes bare (`InferenceApp`), the rest on
    quart-trio."""
    app = _App("scheduler")
    # a path is matched as sent: werkzeug would otherwise answer `/v1//models` with a 308 and
    # an HTML page (a redirect no OpenAI client follows for a POST); unknown paths get our 404
    app.url_map.merge_slashes = False
    http1.install()  # OpenAI-shaped refusals before the app, bare LF refused, half-close
    app.config["MAX_CONTENT_LENGTH"] = replica.settings.server.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # streams last as long as the backend takes
    app.config["BODY_TIMEOUT"] = 60

    @app.before_serving
    async def start() -> None:
        await replica.start(app.nursery)

    @app.after_serving
    async def stop() -> None:
        await replica.stop()

    _add_model_routes(app, replica)
    _add_operations_routes(app, replica)
    app.register_blueprint(create_admin(replica))
    _add_framing_hooks(app)
    _add_error_handlers(app, replica.settings.server.max_body_bytes)
    return InferenceApp(replica, app)


def _add_model_routes(app: QuartTrio, replica: Replica) -> None:
    settings = replica.settings
    created = int(time.time())

    def model_entry(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "scheduler"}

    @app.get("/v1/models")
    async def models() -> Response:
        await replica.gateway.authenticate(request.headers.get("authorization"))
        return _json({"object": "list", "data": [model_entry(m.name) for m in settings.models]})

    @app.get("/v1/models/<path:model>")  # a model name may hold a slash (org/name)
    async def model(model: str) -> Response:
        await replica.gateway.authenticate(request.headers.get("authorization"))
        if not any(m.name == model for m in settings.models):
            message = f"The model '{model}' does not exist or you do not have access to it."
            raise ApiError(404, message, param="model", code="model_not_found")
        return _json(model_entry(model))


def _add_operations_routes(app: QuartTrio, replica: Replica) -> None:
    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = replica.metrics.render()
        return Response(body, status=200, content_type=content_type)

    @app.get("/readyz")
    async def readyz() -> Response:
        readiness = await replica.readiness()
        return _json(readiness, 200 if readiness["ready"] else 503)

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return _json(openapi_document(replica.settings))


def _add_framing_hooks(app: QuartTrio) -> None:
    @app.before_request
    async def refuse_ambiguous_framing() -> None:
        """Content-Length and Transfer-Encoding both: the body's end is ambiguous (request
        smuggling's trick), so RFC 9112 has the connection closed; refused, read, closed."""
        if "content-length" in request.headers and "transfer-encoding" in request.headers:
            raise ambiguous_framing()

    @app.after_request
    async def read_the_rest(response: Response) -> Response:
        """An answer ready before the request's body was read (a 401, 404 or 405, the admin
        API off) first reads that body to its end, so that the connection can carry the
        next request. (Closing instead does not work: hypercorn closes such a connection from
        the app's own task, which quart-trio cancels as the client's side ends, so the
        socket would stay open and the client's next request would hang.) A body over
        `max_body_bytes` is not read: that answer closes the connection."""
        try:
            await request.get_data(cache=False)
        except RequestEntityTooLarge:
            response.headers["Connection"] = "close"
        return response


def _add_error_handlers(app: QuartTrio, max_body_bytes: int) -> None:
    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> Response:
        return _error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        messages = {
            404: f"Unknown route: {request.method} {request.path}",
            405: f"Method {request.method} is not allowed on {request.path}.",
            413: body_too_large(max_body_bytes).message,
        }
        message = messages.get(status, error.description or error.name)
        kind = "invalid_request_error" if status < 500 else "server_error"
        response = _error_response(ApiError(status, message, type=kind))
        if status == 405 and error.get_response().headers.get("Allow"):
            response.headers["Allow"] = error.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error_response(ApiError(500, "Internal error.", type="server_error"))
