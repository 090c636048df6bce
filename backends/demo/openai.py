"""OpenAI request parsing and response shapes for the demo server (no I/O).

    DemoError            an error response in OpenAI's shape
    ├── 400 invalid_request_error   bad JSON, a missing or mistyped field, too long
    ├── 404 invalid_request_error   unknown model or route (code model_not_found / not_found)
    └── 503 server_error            the GPU's waiting room is full (with Retry-After)

Generated text is filler: output token k is word k of a seeded word list, so a response is a
pure function of the seed and its length. Prompt tokens are estimated as characters / 4.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import math
import random
import struct
from dataclasses import dataclass
from typing import Any

from scheduler.openai.errors import OpenAIError

CHARS_PER_TOKEN = 4
_TEXT = """the quick brown fox jumps over lazy dog while model serves tokens from a warm cache
batch decode prefill kernel tensor stream every request gets its fair share of gpu time"""
_WORDS = tuple(_TEXT.split())
_FILLER_LENGTH = 4096


class DemoError(OpenAIError):
    """An error response, its headers as ASGI wants them."""

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        retry_after = self.retry_after()
        if retry_after is not None:
            headers.append((b"retry-after", retry_after.encode()))
        return headers


def bad_request(message: str, param: str | None = None) -> DemoError:
    return DemoError(400, message, param=param)


class Kind(enum.Enum):
    CHAT = "chat"
    COMPLETION = "completion"
    RESPONSE = "response"  # OpenAI's Responses API (`/v1/responses`)


@dataclass(frozen=True, slots=True)
class GenerationCall:
    """What the demo needs from a chat or text completion request, or a response."""

    kind: Kind
    model: str
    prompt_tokens: int
    output_tokens: int
    length_capped: bool  # max_tokens was given: the text ends for "length", not "stop"
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"We could not parse the JSON body of your request: {exc}") from exc
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def parse_model(body: dict[str, Any], model_names: tuple[str, ...]) -> str:
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request("You must provide a model parameter.", "model")
    if model not in model_names:
        raise DemoError(
            404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
        )
    return model


def parse_generation(
    body: dict[str, Any], kind: Kind, model_names: tuple[str, ...], default_output_tokens: int
) -> GenerationCall:
    model = parse_model(body, model_names)
    if kind is Kind.CHAT:
        prompt_tokens = _chat_prompt_tokens(body.get("messages"))
    elif kind is Kind.RESPONSE:
        prompt_tokens = _response_prompt_tokens(body.get("input"), body.get("instructions"))
    else:
        prompt_tokens = _completion_prompt_tokens(body.get("prompt"))
    max_tokens = _max_tokens(body, kind)
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("The demo backend supports n=1 only.", "n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"{stream!r} is not of type 'boolean' - 'stream'", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object.", "stream_options")
    return GenerationCall(
        kind=kind,
        model=model,
        prompt_tokens=prompt_tokens,
        output_tokens=default_output_tokens if max_tokens is None else max_tokens,
        length_capped=max_tokens is not None,
        stream=bool(stream),
        include_usage=bool(options and options.get("include_usage") is True),
    )


def _max_tokens(body: dict[str, Any], kind: Kind) -> int | None:
    names = {
        Kind.CHAT: ("max_completion_tokens", "max_tokens"),
        Kind.COMPLETION: ("max_tokens",),
        Kind.RESPONSE: ("max_output_tokens",),
    }[kind]
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad_request(f"{name} must be an integer >= 1, got {value!r}.", name)
        return value
    return None


def _chars_to_tokens(chars: int) -> int:
    return max(1, math.ceil(chars / CHARS_PER_TOKEN))


def _chat_prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array.", "messages")
    chars = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a role.", "messages")
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
        elif content is not None:
            raise bad_request(f"messages[{i}].content must be a string or an array.", "messages")
    return _chars_to_tokens(chars)


def _response_prompt_tokens(value: Any, instructions: Any) -> int:
    """The Responses API's `input`: a string, or items (messages with a string or parts)."""
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request("instructions must be a string.", "instructions")
    chars = len(instructions or "")
    if isinstance(value, str):
        return _chars_to_tokens(chars + len(value))
    if not isinstance(value, list) or not value:
        raise bad_request("input must be a string or a non-empty array.", "input")
    for i, item in enumerate(value):
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
        elif not isinstance(item, dict):
            raise bad_request(f"input[{i}] must be an object.", "input")
    return _chars_to_tokens(chars)


def _completion_prompt_tokens(prompt: Any) -> int:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return _chars_to_tokens(len(prompt))
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return len(prompt)
    raise bad_request(
        "prompt must be a string or an array of token ids (batches are not supported).",
        "prompt",
    )


class ResponseWriter:
    """Builds OpenAI response bodies with filler text and unique ids."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self._pieces = [" " + rng.choice(_WORDS) for _ in range(_FILLER_LENGTH)]
        self._id_prefix = f"{rng.getrandbits(48):012x}"
        self._count = 0

    def text(self, start: int, stop: int) -> str:
        """Output tokens start..stop-1, as text (token 0 has no leading space)."""
        pieces, n = self._pieces, len(self._pieces)
        text = "".join(pieces[i % n] for i in range(start, stop))
        return text[1:] if start == 0 else text

    def new_id(self, kind: Kind) -> str:
        self._count += 1
        if kind is Kind.RESPONSE:
            return f"resp_{self._id_prefix}{self._count:08x}"
        prefix = "chatcmpl" if kind is Kind.CHAT else "cmpl"
        return f"{prefix}-{self._id_prefix}{self._count:08x}"

    def completion(self, call: GenerationCall, created: int) -> dict[str, Any]:
        if call.kind is Kind.RESPONSE:
            return self.response(call, self.new_id(call.kind), created)
        choice: dict[str, Any] = {"index": 0}
        text = self.text(0, call.output_tokens)
        if call.kind is Kind.CHAT:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason(call)
        return {
            "id": self.new_id(call.kind),
            "object": "chat.completion" if call.kind is Kind.CHAT else "text_completion",
            "created": created,
            "model": call.model,
            "choices": [choice],
            "usage": usage(call.prompt_tokens, call.output_tokens),
        }

    def response(self, call: GenerationCall, response_id: str, created: int) -> dict[str, Any]:
        """A whole Responses API answer: one assistant message; `incomplete` when it ran to
        `max_output_tokens`, as OpenAI's are."""
        text = self.text(0, call.output_tokens)
        part = {"type": "output_text", "text": text, "annotations": []}
        message = {
            "type": "message",
            "id": "msg_" + response_id.removeprefix("resp_"),
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }
        return {
            "id": response_id,
            "object": "response",
            "created_at": created,
            "status": "incomplete" if call.length_capped else "completed",
            "incomplete_details": ({"reason": "max_output_tokens"} if call.length_capped else None),
            "model": call.model,
            "output": [message],
            "usage": {
                "input_tokens": call.prompt_tokens,
                "output_tokens": call.output_tokens,
                "total_tokens": call.prompt_tokens + call.output_tokens,
            },
        }


def finish_reason(call: GenerationCall) -> str:
    return "length" if call.length_capped else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ChunkWriter:
    """The server-sent events of one streamed response."""

    def __init__(self, writer: ResponseWriter, call: GenerationCall, created: int) -> None:
        self._writer = writer
        self._call = call
        self._id, self._created = writer.new_id(call.kind), created
        self._head = {
            "id": self._id,
            "object": "chat.completion.chunk" if call.kind is Kind.CHAT else "text_completion",
            "created": created,
            "model": call.model,
        }

    def tokens(self, start: int, stop: int) -> bytes:
        """The event(s) for output tokens start..stop-1; the chat role comes with the first."""
        call = self._call
        last = stop >= call.output_tokens
        if call.kind is Kind.RESPONSE:
            return self._response_events(start, stop, last)
        events = []
        if start == 0 and call.kind is Kind.CHAT:
            events.append(self._event({"role": "assistant", "content": ""}, None))
        text = self._writer.text(start, stop)
        reason = finish_reason(call) if last else None
        events.append(self._event({"content": text} if call.kind is Kind.CHAT else text, reason))
        if last and call.include_usage:
            total = usage(call.prompt_tokens, call.output_tokens)
            events.append(_sse({**self._head, "choices": [], "usage": total}))
        if last:
            events.append(b"data: [DONE]\n\n")
        return b"".join(events)

    def _response_events(self, start: int, stop: int, last: bool) -> bytes:
        """The Responses API's typed events: created, a text delta per read, and at the end
        completed (or incomplete) with the whole answer and its usage; no `[DONE]`."""
        events = []
        if start == 0:
            created = {"id": self._id, "object": "response", "status": "in_progress"}
            events.append(_typed("response.created", {"response": created}))
        item_id = "msg_" + self._id.removeprefix("resp_")
        delta = {"item_id": item_id, "output_index": 0, "content_index": 0}
        delta["delta"] = self._writer.text(start, stop)
        events.append(_typed("response.output_text.delta", delta))
        if last:
            whole = self._writer.response(self._call, self._id, self._created)
            done = (
                "response.incomplete" if whole["status"] == "incomplete" else "response.completed"
            )
            events.append(_typed(done, {"response": whole}))
        return b"".join(events)

    def _event(self, delta: dict[str, str] | str, reason: str | None) -> bytes:
        choice: dict[str, Any] = {"index": 0}
        if isinstance(delta, dict):
            choice["delta"] = delta
        else:
            choice["text"] = delta
        choice["logprobs"] = None
        choice["finish_reason"] = reason
        chunk: dict[str, Any] = {**self._head, "choices": [choice]}
        if self._call.include_usage:
            chunk["usage"] = None
        return _sse(chunk)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _typed(kind: str, fields: dict[str, Any]) -> bytes:
    """One Responses API event: its type as the SSE event name and in the data."""
    data = json.dumps({"type": kind, **fields}).encode()
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def embeddings(body: dict[str, Any], model: str, dim: int) -> dict[str, Any]:
    """Deterministic unit vectors: a hash of each input, spread over `dim` floats."""
    inputs = _embedding_inputs(body.get("input"))
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad_request("encoding_format must be 'float' or 'base64'.", "encoding_format")
    data, prompt_tokens = [], 0
    for index, item in enumerate(inputs):
        tokens = _chars_to_tokens(len(item)) if isinstance(item, str) else len(item)
        prompt_tokens += tokens
        vector = _vector(repr(item).encode(), dim)
        value: list[float] | str = vector
        if encoding == "base64":
            value = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def _embedding_inputs(value: Any) -> list[str | list[int]]:
    def is_ids(v: Any) -> bool:
        return isinstance(v, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in v
        )

    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value) or all(is_ids(v) and v for v in value):
            return list(value)
        if is_ids(value):
            return [value]
    raise bad_request(
        "input must be a string, an array of strings or (arrays of) token ids.", "input"
    )


def _vector(key: bytes, dim: int) -> list[float]:
    digest = hashlib.shake_128(key).digest(2 * dim)
    raw = [(digest[2 * i] << 8 | digest[2 * i + 1]) / 32767.5 - 1.0 for i in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]
