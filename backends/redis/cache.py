"""The response cache: what the gateway serves when it sheds a request.

Why this design: an entry is found by who may read it (the scope) and by what was asked (the
canonical request), so a shed request is served the answer to the same question, never another
tenant's. The canonical request is an allow-list: the route, the model, the input and the
parameters that change the answer. `stream`, `user`, `metadata` and every field nobody listed
(a client's cache key or salt included) are left out, so a client can neither split nor choose
its entry. Key layout, one plain string per entry:

    <prefix>:<sha256(scope)[:16]>:<sha256(canonical request)>

The value is msgpack: `{"body", "content_type", "fresh_until", "created", "scope"}`, where
`scope` is the full SHA-256 of the scope, checked on every read, so that even two scopes whose
16-digit prefixes collide never read each other's entries. Entries are shared by replicas, so
their times are wall-clock unix seconds, given by the caller (`now_unix`); the entry lives
`fresh_s + stale_s` in Redis (one SET with PX) and reads as stale after `fresh_s`. An entry
that does not decode (another version's layout, a foreign value) is a miss, not an error.

Errors, split by who is to blame:

    CacheError              Redis answered with an error (a bug, or a foreign key type)
    └── CacheUnavailable    Redis could not be reached in time: the caller treats it as a miss

The store behind the `scheduler.core.cache.Cache` role. Entries are whole completions;
`scheduler.openai.sse` turns them into a stream and back.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import coredis
import coredis.exceptions
import msgpack  # type: ignore[import-untyped]
import trio

from backends.redis.pipeliner import RedisPipeliner
from scheduler.core.cache import CacheHit
from scheduler.errors import SchedulerError

T = TypeVar("T")

MiB = 1024 * 1024

# The request fields that change the answer. Anything else is left out of the cache key.
OPENAI_FIELDS = frozenset(
    {
        "model",
        "messages",
        "prompt",
        "input",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "suffix",
        "echo",
        "best_of",
        "dimensions",
        "encoding_format",
        "reasoning_effort",
        "verbosity",
        "modalities",
        "audio",
        "prediction",
        "web_search_options",
    }
)
# Sampling and decoding extensions of OpenAI-compatible servers (vLLM, TGI, llama.cpp).
SERVER_FIELDS = frozenset(
    {
        "top_k",
        "min_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "min_tokens",
        "stop_token_ids",
        "ignore_eos",
        "include_stop_str_in_output",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "bad_words",
        "allowed_token_ids",
        "prompt_logprobs",
        "truncate_prompt_tokens",
        "use_beam_search",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_whitespace_pattern",
        "structured_outputs",
        "chat_template",
        "chat_template_kwargs",
        "add_generation_prompt",
        "continue_final_message",
        "add_special_tokens",
        "documents",
        "grammar",
        "json_schema",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "n_predict",
    }
)
CACHE_KEY_FIELDS = OPENAI_FIELDS | SERVER_FIELDS

_UNAVAILABLE = (
    coredis.exceptions.ConnectionError,  # refused, reset, still loading its dataset
    coredis.exceptions.ClusterDownError,
    coredis.exceptions.TryAgainError,
    TimeoutError,
    OSError,
)


class CacheError(SchedulerError):
    """The cache could not do what was asked (see the module docstring's tree)."""


class CacheUnavailable(CacheError):
    """Redis could not be reached, or did not answer within the cache's timeout."""


def canonical_request(route: str, body: Mapping[str, Any]) -> bytes:
    """The canonical form of an OpenAI request: JSON of the route and the allow-listed fields.

    Keys sorted at every depth, no whitespace; a field set to null counts as absent.
    """
    request = {k: v for k, v in body.items() if k in CACHE_KEY_FIELDS and v is not None}
    canonical = {"route": route, "request": request}
    return json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()


def request_digest(route: str, body: Mapping[str, Any]) -> str:
    """The SHA-256 (hex) of `canonical_request(route, body)`."""
    return hashlib.sha256(canonical_request(route, body)).hexdigest()


def _scope_digest(scope: str) -> str:
    if not isinstance(scope, str) or not scope:
        raise ValueError(f"scope must be a non-empty string, got {scope!r}")
    return hashlib.sha256(scope.encode()).hexdigest()


def _check_time(name: str, value: float, *, duration: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if duration and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


class ResponseCache:
    """Cached responses in Redis, per scope and canonical request.

    `redis` is a connected coredis client returning bytes, entered and left by one task that
    outlives the cache. `timeout_s` bounds every call, raising `CacheUnavailable` when it runs
    out. Responses larger than `max_bytes` are not stored.
    """

    def __init__(
        self,
        redis: coredis.Redis[bytes],
        *,
        prefix: str = "cache",
        timeout_s: float | None = None,
        max_bytes: int = MiB,
        pipeliner: RedisPipeliner | None = None,
    ) -> None:
        """`pipeliner`: send `get` and `put` through it (the service does), else alone."""
        if not prefix:
            raise ValueError("prefix must be non-empty")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        self._redis = redis
        self._prefix = prefix
        self._timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._pipeliner = pipeliner

    def key(self, scope: str, route: str, body: Mapping[str, Any]) -> str:
        """The Redis key of the entry for `body` on `route` under `scope`."""
        return f"{self._prefix}:{_scope_digest(scope)[:16]}:{request_digest(route, body)}"

    async def put(
        self,
        scope: str,
        route: str,
        body: Mapping[str, Any],
        response: bytes,
        *,
        now_unix: float,
        fresh_s: float,
        stale_s: float,
        content_type: str = "application/json",
    ) -> None:
        """Store `response` for `body` under `scope`: fresh for `fresh_s`, then stale for
        `stale_s`, then gone. A response over `max_bytes` is not stored."""
        _check_time("now_unix", now_unix)
        _check_time("fresh_s", fresh_s, duration=True)
        _check_time("stale_s", stale_s, duration=True)
        if fresh_s + stale_s <= 0:
            raise ValueError("fresh_s + stale_s must be > 0")
        if not isinstance(response, bytes):
            raise ValueError(f"response must be bytes, got {type(response).__name__}")
        if len(response) > self.max_bytes:
            return
        key = self.key(scope, route, body)
        entry = {
            "body": response,
            "content_type": content_type,
            "fresh_until": float(now_unix + fresh_s),
            "created": float(now_unix),
            "scope": _scope_digest(scope),
        }
        value: bytes = msgpack.packb(entry, use_bin_type=True)
        ttl_ms = max(1, math.ceil((fresh_s + stale_s) * 1000))
        await self._command(lambda redis: redis.set(key, value, px=ttl_ms))

    async def get(
        self, scope: str, route: str, body: Mapping[str, Any], *, now_unix: float
    ) -> CacheHit | None:
        """The cached response for `body` under `scope`, or None (absent, expired, undecodable)."""
        _check_time("now_unix", now_unix)
        key = self.key(scope, route, body)
        raw = await self._command(lambda redis: redis.get(key))
        if raw is None:
            return None
        return _decode(raw, _scope_digest(scope), now_unix)

    async def _command(self, command: Callable[[Any], Awaitable[T]]) -> T:
        """Run one command (`command` is given the client, or the pipeline when there is a
        pipeliner); the one place where coredis' and trio's errors are translated."""
        pipeliner = self._pipeliner
        try:
            with trio.fail_after(math.inf if self._timeout_s is None else self._timeout_s):
                if pipeliner is None:
                    return await command(self._redis)
                reply: T = await pipeliner.execute(command)
                return reply
        except trio.TooSlowError as exc:
            raise CacheUnavailable(f"redis did not answer within {self._timeout_s} s") from exc
        except _UNAVAILABLE as exc:
            raise CacheUnavailable(f"redis is unreachable: {exc}") from exc
        except coredis.exceptions.RedisError as exc:
            raise CacheError(f"redis refused a cache command: {exc}") from exc


def _decode(raw: bytes | str, scope_digest: str, now_unix: float) -> CacheHit | None:
    if not isinstance(raw, bytes):
        return None
    try:
        entry: Any = msgpack.unpackb(raw, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if not isinstance(entry, dict) or entry.get("scope") != scope_digest:
        return None
    body, content_type = entry.get("body"), entry.get("content_type")
    fresh_until, created = entry.get("fresh_until"), entry.get("created")
    if not (isinstance(body, bytes) and isinstance(content_type, str)):
        return None
    if not (isinstance(fresh_until, int | float) and isinstance(created, int | float)):
        return None
    return CacheHit(
        body=body,
        content_type=content_type,
        stale=now_unix >= fresh_until,
        age_s=max(0.0, now_unix - created),
    )
