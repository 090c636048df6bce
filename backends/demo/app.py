"""The demo GPU server as a plain ASGI app: vLLM's HTTP surface over a `DemoEngine`.

Why plain ASGI and not quart-trio: under hypercorn, a trivial quart-trio route served about
1,250 requests/s on one core where the same route as bare ASGI served about 1,600/s (64
keep-alive clients; hypercorn's own HTTP handling is most of the rest, and this app's
completions cost about what the bare route does). The demo is the gateway's default backend
and the load in its throughput benchmark, so it should cost little; eight fixed routes need no
framework.

The engine runs for as long as the app's ASGI lifespan (hypercorn runs it), unless its owner
started it before. A request that
uses the GPU watches its connection while it waits or streams: when the client goes away its
handler is cancelled and the sequence leaves the model, freeing the batch slot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from backends.demo.engine import DemoEngine, EngineStopped, Refusal, Ticket, TicketState
from backends.demo.metrics import DemoMetrics
from backends.demo.openai import (
    ChunkWriter,
    DemoError,
    GenerationCall,
    Kind,
    ResponseWriter,
    bad_request,
    embeddings,
    parse_generation,
    parse_json,
    parse_model,
)
from scheduler.models.gpu import GpuConfig, GpuStats

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[bytes, Receive, Send], Awaitable[None]]

TRACEPARENTS_KEPT = 100
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo server: its GPU, the model names it answers to, the shape of its output."""

    gpu: GpuConfig = dataclasses.field(default_factory=GpuConfig)
    model_names: tuple[str, ...] = ("demo-small",)
    default_output_tokens: int = 64  # when a request sets no max_tokens
    embedding_dim: int = 16
    seed: int = 0  # the filler text and the ids
    max_body_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.model_names or not all(self.model_names):
            raise ValueError("demo.model_names must name at least one model")
        for name in ("default_output_tokens", "embedding_dim", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo.{name} must be >= 1, got {getattr(self, name)}")


class _Disconnected(Exception):
    pass


class DemoApp:
    """An ASGI app that behaves like a vLLM server on the modelled GPU."""

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.metrics = DemoMetrics(config.model_names[0], self._statistics)
        self.engine = DemoEngine(config.gpu, on_ended=self.metrics.observe_ended)
        self._writer = ResponseWriter(config.seed)
        self._traceparents: deque[str] = deque(maxlen=TRACEPARENTS_KEPT)
        self._created = int(time.time())
        self._routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/v1/responses": {"POST": self._responses},
            "/v1/embeddings": {"POST": self._embeddings},
            "/v1/models": {"GET": self._models},
            "/metrics": {"GET": self._metrics},
            "/health": {"GET": self._health},
            "/demo/config": {"GET": self._get_config, "POST": self._set_config},
            "/demo/traceparents": {"GET": self._get_traceparents},
        }

    @property
    def traceparents(self) -> list[str]:
        """The last `traceparent` headers received, oldest first."""
        return list(self._traceparents)

    def _statistics(self) -> GpuStats:
        return self.engine.statistics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        async with trio.open_nursery() as nursery:
            if not self.engine.live:  # else its owner runs it (see serve_demo_backend)
                await nursery.start(self.engine.run)
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            nursery.cancel_scope.cancel()
        await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        for name, value in scope["headers"]:
            if name == b"traceparent":
                self._traceparents.append(value.decode("latin-1"))
        try:
            handler = self._route(scope["path"], scope["method"])
            body = await _read_body(receive, self.config.max_body_bytes)
            await handler(body, receive, send)
        except DemoError as error:
            await _respond(send, error.status, error.body(), error.headers())
        except _Disconnected:
            pass

    def _route(self, path: str, method: str) -> Handler:
        methods = self._routes.get(path)
        if methods is None:
            raise DemoError(404, f"No route {path}.", code="not_found")
        handler = methods.get(method)
        if handler is None:
            raise DemoError(405, f"Method {method} is not allowed on {path}.")
        return handler

    async def _chat(self, body: bytes, receive: Receive, send: Send) -> None:
        await self._generate(Kind.CHAT, body, receive, send)

    async def _completions(self, body: bytes, receive: Receive, send: Send) -> None:
        await self._generate(Kind.COMPLETION, body, receive, send)

    async def _responses(self, body: bytes, receive: Receive, send: Send) -> None:
        await self._generate(Kind.RESPONSE, body, receive, send)

    async def _generate(self, kind: Kind, body: bytes, receive: Receive, send: Send) -> None:
        config = self.config
        call = parse_generation(
            parse_json(body), kind, config.model_names, config.default_output_tokens
        )
        try:
            ticket = self.engine.submit(
                call.prompt_tokens, call.output_tokens, streaming=call.stream
            )
        except EngineStopped as exc:
            raise DemoError(503, str(exc), type="server_error", retry_after_s=1) from exc
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            try:
                if call.stream:
                    await self._stream(call, ticket, send)
                else:
                    await self._complete(call, ticket, send)
            finally:
                self.engine.cancel(ticket)  # a no-op once it ended
            nursery.cancel_scope.cancel()

    async def _complete(self, call: GenerationCall, ticket: Ticket, send: Send) -> None:
        await ticket.wait_ended()
        if ticket.state is TicketState.FINISHED:
            response = self._writer.completion(call, int(time.time()))
            await _respond(send, 200, json.dumps(response).encode(), _JSON)
        else:
            await _respond_error(send, self._refusal_error(ticket))

    async def _stream(self, call: GenerationCall, ticket: Ticket, send: Send) -> None:
        await ticket.wait_decided()
        if ticket.state is TicketState.REFUSED:
            await _respond_error(send, self._refusal_error(ticket))
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        chunks = ChunkWriter(self._writer, call, int(time.time()))
        sent = 0
        while sent < ticket.output_tokens:
            await ticket.wait_tokens_beyond(sent)
            ready = ticket.tokens_ready
            more = ready < ticket.output_tokens
            body = chunks.tokens(sent, ready)
            await send({"type": "http.response.body", "body": body, "more_body": more})
            sent = ready

    def _refusal_error(self, ticket: Ticket) -> DemoError:
        gpu = self.engine.config
        if ticket.refusal is Refusal.TOO_LONG:
            total = ticket.prompt_tokens + ticket.output_tokens
            return DemoError(
                400,
                f"This model's maximum context length is {gpu.kv_capacity_tokens} tokens. "
                f"However, you requested {total} tokens ({ticket.prompt_tokens} in the "
                f"prompt, {ticket.output_tokens} for the completion).",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return DemoError(
            503,
            f"The demo GPU is overloaded: its waiting room is full ({gpu.max_waiting} "
            "requests). Retry later.",
            type="server_error",
            code="overloaded",
            retry_after_s=ticket.retry_after_s,
        )

    async def _embeddings(self, body: bytes, receive: Receive, send: Send) -> None:
        request = parse_json(body)
        model = parse_model(request, self.config.model_names)
        response = embeddings(request, model, self.config.embedding_dim)
        await _respond(send, 200, json.dumps(response).encode(), _JSON)

    async def _models(self, body: bytes, receive: Receive, send: Send) -> None:
        cards = [
            {
                "id": name,
                "object": "model",
                "created": self._created,
                "owned_by": "demo",
                "root": name,
                "parent": None,
                "max_model_len": self.engine.config.kv_capacity_tokens,
            }
            for name in self.config.model_names
        ]
        await _respond_json(send, {"object": "list", "data": cards})

    async def _metrics(self, body: bytes, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
        await _respond(send, 200, self.metrics.render(), headers)

    async def _health(self, body: bytes, receive: Receive, send: Send) -> None:
        await _respond(send, 200, b"", [])

    async def _get_config(self, body: bytes, receive: Receive, send: Send) -> None:
        await _respond_json(send, dataclasses.asdict(self.engine.config))

    async def _set_config(self, body: bytes, receive: Receive, send: Send) -> None:
        config = updated_gpu_config(self.engine.config, parse_json(body))
        await self.engine.reconfigure(config)
        await _respond_json(send, dataclasses.asdict(config))

    async def _get_traceparents(self, body: bytes, receive: Receive, send: Send) -> None:
        await _respond_json(send, {"traceparents": self.traceparents})


def updated_gpu_config(current: GpuConfig, changes: dict[str, Any]) -> GpuConfig:
    """`current` with `changes` applied; a 400 naming the field when one is wrong."""
    clean: dict[str, Any] = {}
    for name, value in changes.items():
        if not hasattr(current, name):
            known = ", ".join(f.name for f in dataclasses.fields(GpuConfig))
            raise bad_request(f"Unknown GPU setting {name!r}; known: {known}.", name)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(getattr(current, name), int):
            if not (number and float(value).is_integer()):
                raise bad_request(f"{name} must be an integer, got {value!r}.", name)
            clean[name] = int(value)
        else:
            if not (number and math.isfinite(value)):
                raise bad_request(f"{name} must be a finite number, got {value!r}.", name)
            clean[name] = float(value)
    try:
        return dataclasses.replace(current, **clean)
    except ValueError as exc:
        param = next((name for name in clean if name in str(exc)), None)
        raise bad_request(str(exc), param) from exc


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise DemoError(413, f"The request body is over {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    length = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})
    await send({"type": "http.response.body", "body": body})


async def _respond_json(send: Send, obj: Any) -> None:
    await _respond(send, 200, json.dumps(obj).encode(), _JSON)


async def _respond_error(send: Send, error: DemoError) -> None:
    await _respond(send, error.status, error.body(), error.headers())


def create_demo_app(config: DemoConfig) -> DemoApp:
    """The demo server as an ASGI app; serve it with hypercorn (its lifespan runs the engine)."""
    return DemoApp(config)
