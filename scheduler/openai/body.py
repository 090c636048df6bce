"""Reading OpenAI request bodies: validate what the gateway relies on, estimate tokens.

The gateway forwards the client's bytes untouched; it only reads what it needs to schedule
(model, stream, the size of the prompt, `max_tokens`) and refuses bodies that the backend
would refuse anyway, with OpenAI's error messages, before they cost a queue slot.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from scheduler.core import request_cost
from scheduler.openai.errors import bad_request

CHARS_PER_TOKEN = 4  # the usual rough estimate for English text
MAX_TOKENS_CAP = 1_000_000
# Why 64: OpenAI's own bodies nest about 6 deep (messages[i].content[j].image_url.url), and the
# JSON Schemas in `tools` and `response_format` add two levels per nested object, so 64 leaves
# room for a schema nested ~28 objects deep; anything deeper is no real request. What reads the
# body after parsing (the cache key's json.dumps, msgpack, logging) recurses, and Python's
# recursion limit (1000, less the stack already in use) is hit near 950 levels: a 976-deep
# `stop` was once a 500. 64 is far below that, whatever the stack's depth at the time.
MAX_JSON_DEPTH = 64


@dataclass(frozen=True, slots=True)
class InferenceCall:
    """What the scheduler needs to know about one request."""

    route: str  # "chat", "completions", "responses", "embeddings"
    model: str
    stream: bool
    prompt_tokens: int
    max_tokens: int
    body: dict[str, Any]

    @property
    def cost(self) -> float:
        return request_cost(self.prompt_tokens, self.max_tokens)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> dict[str, Any]:
    """A JSON object, strictly: no NaN/Infinity, and any JSON error (too deep, too many
    digits, bad UTF-8) is the caller's 400, never our 500."""
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, digits
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise bad_request(f"We could not parse the JSON body of your request: {reason}") from exc
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    _check_tree(body)
    return body


def _check_tree(body: dict[str, Any]) -> None:
    """Refuse what parsed but cannot be kept: nesting past MAX_JSON_DEPTH, and numbers too big
    for a float (`1e999999` parses as infinity, which no backend and no JSON encoder accepts).
    A quick pass finds whether there is an offender; only then is it named (a path for every
    item would cost more than parsing the body)."""
    if not _has_offender(body):
        return
    for name, value in body.items():
        if _has_offender({name: value}):
            where = _non_finite_at(value, name)
            if where is not None:
                raise bad_request(f"'{where}' must be a finite number.", param=where)
            message = f"The body nests more than {MAX_JSON_DEPTH} levels deep (in '{name}')."
            raise bad_request(message, param=name)


def _has_offender(body: dict[str, Any]) -> bool:
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        for value in node.values() if isinstance(node, dict) else node:
            kind = type(value)  # json.loads makes exactly these types
            if kind is float and not math.isfinite(value):
                return True
            if kind is dict or kind is list:
                if depth >= MAX_JSON_DEPTH:
                    return True
                stack.append((value, depth + 1))
    return False


def _non_finite_at(value: Any, where: str) -> str | None:
    """The path of the first infinite number in `value` (at `where`), if any."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return at
        if isinstance(item, dict):
            stack.extend((v, f"{at}.{k}") for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((v, f"{at}[{i}]") for i, v in reversed(list(enumerate(item))))
    return None


def prompt_text(request_id: int, prompt_tokens: int) -> str:
    """A `/v1/completions` prompt that the estimate here reads as exactly `prompt_tokens`
    tokens (4 P - 1 characters; 0 reads as 1), starting with `request_id` so that no two are
    alike (engines cache prompts by prefix): the load of benches and calibration."""
    length = max(0, 4 * prompt_tokens - 1)
    tag = f"{request_id:x}-"
    if length <= len(tag):
        return tag[len(tag) - length :]
    return tag + "x" * (length - len(tag))


# where a prompt's text is: message content and its parts, and the tool calls a conversation
# carries back (chat's `tool_calls[].function.arguments`, the Responses API's
# `function_call` arguments and `function_call_output` output)
_PROMPT_KEYS = frozenset({"text", "content", "tool_calls", "function", "arguments", "output"})


def _text_tokens(value: Any) -> int:
    """A rough token count of any prompt-like JSON value (iterative: any depth is fine)."""
    tokens, stack = 0, [value]
    while stack:
        item = stack.pop()
        if item is None:
            continue
        if isinstance(item, str):
            tokens += len(item) // CHARS_PER_TOKEN + 1
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(v for k, v in item.items() if k in _PROMPT_KEYS)
        else:
            tokens += 1
    return tokens


def _int_field(body: dict[str, Any], name: str, *, low: int, high: int) -> int | None:
    if name not in body or body[name] is None:
        return None
    value = body[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON Schema's integer: 5.0 is 5
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer.", param=name)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low} and {high}.", param=name)
    return value


def _messages(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if messages is None:
        raise bad_request("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array.", param="messages")
    tokens = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"'{where}' must be an object.", param=where)
        if not isinstance(message.get("role"), str):
            raise bad_request(f"Missing required parameter: '{where}.role'.", param=f"{where}.role")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise bad_request(f"'{where}.content' must be a string or an array.", param=where)
        tokens += 4 + _text_tokens(content) + _text_tokens(message.get("tool_calls"))
    return tokens


def _prompt(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if value is None:
        raise bad_request(f"Missing required parameter: '{name}'.", param=name)

    def token(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def piece(v: Any) -> bool:  # a string, a token id, or a list of token ids
        return isinstance(v, str) or token(v) or (isinstance(v, list) and all(map(token, v)))

    ok = isinstance(value, str) or (isinstance(value, list) and all(map(piece, value)))
    if not ok or value == []:
        raise bad_request(
            f"'{name}' must be a string or an array of strings or tokens.", param=name
        )
    return _text_tokens(value)


def _tools_tokens(body: dict[str, Any]) -> int:
    """The tools offered (`tools`: names, descriptions, parameter schemas), which the
    engine's chat template writes into the prompt: their JSON's length, as tokens."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return 0
    return len(json.dumps(tools)) // CHARS_PER_TOKEN + 1


def _prompts(prompt: Any) -> int:
    """How many prompts `/v1/completions` was given: a batch is a list of strings or of
    token lists; a string, or one list of token ids, is one."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def _responses_input(body: dict[str, Any]) -> int:
    """The Responses API's `input` (a string, or an array of items: messages, their content
    parts, tool outputs) and `instructions`, as tokens."""
    value = body.get("input")
    if value is None:
        raise bad_request("Missing required parameter: 'input'.", param="input")
    if not isinstance(value, str | list) or value == []:
        raise bad_request("'input' must be a string or a non-empty array.", param="input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request("'instructions' must be a string.", param="instructions")
    return _text_tokens(value) + _text_tokens(instructions)


def read_call(route: str, raw: bytes, *, default_max_tokens: int) -> InferenceCall:
    """Validate `raw` for `route` and estimate its cost; raises ApiError(400) on bad input."""
    body = parse_body(raw)
    model = body.get("model")
    if model is None:
        raise bad_request("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must be a non-empty string.", param="model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", param="stream")
    n = _int_field(body, "n", low=1, high=128) or 1
    if route == "chat":
        prompt_tokens = _messages(body) + _tools_tokens(body)
        max_tokens = _int_field(body, "max_completion_tokens", low=1, high=MAX_TOKENS_CAP)
        if max_tokens is None:
            max_tokens = _int_field(body, "max_tokens", low=1, high=MAX_TOKENS_CAP)
    elif route == "completions":
        prompt_tokens = _prompt(body, "prompt")
        max_tokens = _int_field(body, "max_tokens", low=1, high=MAX_TOKENS_CAP)
        n *= _prompts(body["prompt"])  # n answers to each prompt of a batch
    elif route == "responses":
        prompt_tokens = _responses_input(body) + _tools_tokens(body)
        max_tokens = _int_field(body, "max_output_tokens", low=1, high=MAX_TOKENS_CAP)
        n = 1  # one answer per request, always
    else:
        prompt_tokens = _prompt(body, "input")
        max_tokens, stream = 0, False
    if max_tokens is None:
        max_tokens = default_max_tokens
    return InferenceCall(route, model, stream, prompt_tokens, max_tokens * n, body)
