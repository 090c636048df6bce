"""OpenAI's streamed answers (server-sent events) to and from whole completions.

    check_completion    whether a whole answer is one OpenAI would send (only those are
                        cached: never an HTML page or a JSON error behind a 200)
    completion_to_sse   a whole completion as the events of the same answer streamed: how a
                        cached answer is served to a client that asked for `stream: true`
    sse_to_completion   the events of a streamed answer as the whole completion: how a
                        streamed answer is cached

Chat (`/v1/chat/completions`, `chat.completion.chunk` events) and completions
(`/v1/completions`, `text_completion` events). A stream becomes a completion only when it
ended well (`data: [DONE]`, every choice with a `finish_reason`); deltas are joined per
choice, tool calls per call index.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
DONE_EVENT = b"data: [DONE]\n\n"
_WORD = re.compile(r"\s*\S+\s*|\s+")


EMBEDDINGS_ROUTE = "/v1/embeddings"
_CHOICE_FIELD = {CHAT_ROUTE: "message", COMPLETIONS_ROUTE: "text"}


def check_completion(route: str, body: bytes) -> None:
    """Raises ValueError unless `body` is a whole answer of `route`'s kind: a JSON object with
    a non-empty `choices` list whose entries carry a `message` object (chat) or a `text`
    (completions), or a `data` list of embeddings."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(answer, dict):
        raise ValueError("not a JSON object")
    if route == EMBEDDINGS_ROUTE:
        data = answer.get("data")
        if not (isinstance(data, list) and all(isinstance(d, dict) for d in data) and data):
            raise ValueError("an embeddings answer without a `data` list")
        return
    field, choices = _CHOICE_FIELD.get(route), answer.get("choices")
    if field is None:
        raise ValueError(f"no answers are known for {route!r}")
    if not (isinstance(choices, list) and choices):
        raise ValueError("an answer without `choices`")
    kind = dict if field == "message" else str
    if not all(isinstance(c, dict) and isinstance(c.get(field), kind) for c in choices):
        raise ValueError(f"a choice without its `{field}`")


def completion_to_sse(
    route: str, body: bytes, *, include_usage: bool = False, max_pieces: int = 8
) -> list[bytes]:
    """The SSE events (`data: ...\\n\\n` each, `data: [DONE]` last) of a cached completion.

    Chat (`/v1/chat/completions`): per choice, a chunk with the assistant role, the content in
    at most `max_pieces` pieces cut between words, the refusal, tool or function calls in one
    chunk each, and a last chunk with the `finish_reason` (and the choice's logprobs, if any).
    Completions (`/v1/completions`): per choice, the text in pieces, then the `finish_reason`.
    `include_usage` adds the usage chunk a client asks for with `stream_options`.
    Raises ValueError for another route or a body that is not a completion.
    """
    if route not in (CHAT_ROUTE, COMPLETIONS_ROUTE):
        raise ValueError(f"only {CHAT_ROUTE} and {COMPLETIONS_ROUTE} stream, got {route!r}")
    if max_pieces < 1:
        raise ValueError(f"max_pieces must be >= 1, got {max_pieces!r}")
    completion = json.loads(body)
    if not isinstance(completion, dict) or not isinstance(completion.get("choices"), list):
        raise ValueError("the cached body is not a completion (no 'choices' list)")
    chat = route == CHAT_ROUTE
    head = {
        "id": completion.get("id", ""),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": completion.get("created", 0),
        "model": completion.get("model", ""),
    }
    head |= {k: completion[k] for k in ("system_fingerprint", "service_tier") if k in completion}
    events: list[bytes] = []
    for choice in completion["choices"]:
        if not isinstance(choice, dict) or not isinstance(choice.get("message", {}), dict):
            raise ValueError(f"the cached body holds a malformed choice: {choice!r}")
        pieces = _chat_choices(choice, max_pieces) if chat else _text_choices(choice, max_pieces)
        events += [_event({**head, "choices": [piece]}) for piece in pieces]
    if include_usage and completion.get("usage") is not None:
        events.append(_event({**head, "choices": [], "usage": completion["usage"]}))
    events.append(DONE_EVENT)
    return events


def split_words(text: str, max_pieces: int) -> list[str]:
    """`text` in at most `max_pieces` non-empty pieces cut between words; they join to `text`."""
    words = _WORD.findall(text)
    if not words:
        return []
    count = min(max_pieces, len(words))
    bounds = [i * len(words) // count for i in range(count + 1)]
    return ["".join(words[a:b]) for a, b in pairwise(bounds)]


def _chat_choices(choice: Mapping[str, Any], max_pieces: int) -> list[dict[str, Any]]:
    index = choice.get("index", 0)
    message = choice.get("message") or {}
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    content = message.get("content")
    if isinstance(content, str):
        deltas += [{"content": piece} for piece in split_words(content, max_pieces)]
    if message.get("refusal"):
        deltas.append({"refusal": message["refusal"]})
    if message.get("tool_calls"):
        calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        deltas.append({"tool_calls": calls})
    if message.get("function_call"):
        deltas.append({"function_call": message["function_call"]})
    chunks = [_choice(index, "delta", delta) for delta in deltas]
    last = _choice(index, "delta", {}, choice.get("finish_reason") or "stop")
    return [*chunks, {**last, "logprobs": choice.get("logprobs")}]


def _text_choices(choice: Mapping[str, Any], max_pieces: int) -> list[dict[str, Any]]:
    index = choice.get("index", 0)
    text = choice.get("text")
    pieces = split_words(text, max_pieces) if isinstance(text, str) else []
    chunks = [_choice(index, "text", piece) for piece in pieces]
    last = _choice(index, "text", "", choice.get("finish_reason") or "stop")
    return [*chunks, {**last, "logprobs": choice.get("logprobs")}]


def _choice(index: int, field: str, value: Any, finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, field: value, "logprobs": None, "finish_reason": finish_reason}


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def sse_to_completion(route: str, stream: bytes) -> bytes:
    """The whole completion (JSON) that the events of a streamed answer add up to.

    Raises ValueError for another route, or a stream that did not end well or is not what
    OpenAI sends: no `[DONE]`, a choice without a `finish_reason`, an event that is not a JSON
    object, an error event, a field of the wrong type. Lines other than `data:` (comments,
    `event:`) are skipped; logprobs are not kept (a caller that wants them must not cache).
    """
    if route not in (CHAT_ROUTE, COMPLETIONS_ROUTE):
        raise ValueError(f"only {CHAT_ROUTE} and {COMPLETIONS_ROUTE} stream, got {route!r}")
    try:
        return _joined(route == CHAT_ROUTE, stream)
    except (AttributeError, TypeError, KeyError) as exc:  # a field of an unexpected type
        raise ValueError(f"not a completion stream: {exc!r}") from exc


def _joined(chat: bool, stream: bytes) -> bytes:
    head: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    usage: Any = None
    done = False
    for line in stream.splitlines():
        if not line.startswith(b"data:"):
            continue
        if done:
            raise ValueError("an event after [DONE]")
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        if not isinstance(chunk, dict) or "error" in chunk:
            raise ValueError(f"not a completion chunk: {data[:200]!r}")
        head = head or {k: chunk[k] for k in _HEAD_FIELDS if k in chunk}
        usage = chunk.get("usage") or usage
        for delta in chunk.get("choices") or ():
            _add_choice(choices, delta, chat)
    if not done or not choices or any(c["finish_reason"] is None for c in choices.values()):
        raise ValueError("the stream did not end well")
    completion: dict[str, Any] = {
        "id": head.get("id", ""),
        "object": "chat.completion" if chat else "text_completion",
        "created": head.get("created", 0),
        "model": head.get("model", ""),
        **{k: head[k] for k in ("system_fingerprint", "service_tier") if k in head},
        "choices": [_finished(choices[i], chat) for i in sorted(choices)],
    }
    if usage is not None:
        completion["usage"] = usage
    return json.dumps(completion, separators=(",", ":")).encode()


_HEAD_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")


def _add_choice(choices: dict[int, dict[str, Any]], part: Any, chat: bool) -> None:
    if not isinstance(part, dict):
        raise ValueError(f"a malformed choice: {part!r}")
    index = part.get("index", 0)
    choice = choices.setdefault(index, {"index": index, "finish_reason": None, "parts": {}})
    parts: dict[str, Any] = choice["parts"]
    if chat:
        delta = part.get("delta") or {}
        if not isinstance(delta, dict):
            raise ValueError(f"a malformed delta: {delta!r}")
        for field in ("content", "refusal"):
            if isinstance(delta.get(field), str):
                parts[field] = parts.get(field, "") + delta[field]
        for call in delta.get("tool_calls") or ():
            _add_call(parts.setdefault("tool_calls", {}).setdefault(call.get("index", 0), {}), call)
        if isinstance(delta.get("function_call"), dict):
            _add_call(parts.setdefault("function_call", {}), {"function": delta["function_call"]})
    elif isinstance(part.get("text"), str):
        parts["text"] = parts.get("text", "") + part["text"]
    if part.get("finish_reason"):
        choice["finish_reason"] = part["finish_reason"]


def _add_call(call: dict[str, Any], delta: Mapping[str, Any]) -> None:
    """Tool call deltas: `id` and `type` once, the function's name and arguments in pieces."""
    for field in ("id", "type"):
        if delta.get(field):
            call[field] = delta[field]
    function = call.setdefault("function", {})
    for field in ("name", "arguments"):
        piece = (delta.get("function") or {}).get(field)
        if isinstance(piece, str):
            function[field] = function.get(field, "") + piece


def _finished(choice: dict[str, Any], chat: bool) -> dict[str, Any]:
    parts = choice["parts"]
    done = {"index": choice["index"], "logprobs": None, "finish_reason": choice["finish_reason"]}
    if not chat:
        return {"text": parts.get("text", ""), **done}
    message: dict[str, Any] = {"role": "assistant", "content": parts.get("content") or None}
    if parts.get("refusal"):
        message["refusal"] = parts["refusal"]
    if parts.get("tool_calls"):
        message["tool_calls"] = [parts["tool_calls"][i] for i in sorted(parts["tool_calls"])]
    if parts.get("function_call"):
        message["function_call"] = parts["function_call"]["function"]
    if message["content"] is None and len(message) == 2:
        message["content"] = ""  # an empty answer, not a call
    return {"message": message, **done}
