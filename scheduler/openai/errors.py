"""The OpenAI API's error shape, shared by the gateway's errors and the demo backend's.

    OpenAIError              the shape; the demo backend's errors are these
    └── ApiError             a response the gateway's client gets instead of a completion
        ├── caller's fault       400 invalid_request_error, 401, 404, 405, 413, 429
        └── upstream/overload    502, 503 (always with Retry-After), 504

Every error body is `{"error": {"message", "type", "param", "code"}}`; `retry_after_s`
becomes a `Retry-After` header in whole seconds, at least 1.

Why refusals carry more: a 429 or a 503 is the gateway deciding, and a client (or the
operator reading its logs) can only act on it if it says which knob decided, where that knob
stands, what was measured against it, and whether asking again can succeed. Every 429 and
503 is therefore made by `refused`, the one constructor, from a `Refusal`; its fields join
OpenAI's four inside `error` (clients that know only those four ignore the rest), a 503 names
its reason in `x-scheduler-shed`, and both always carry `Retry-After`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

from scheduler.errors import SchedulerError


class OpenAIError(SchedulerError):
    """An error response in OpenAI's shape; subclasses say how the headers are carried."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s
        self.extra_headers: dict[str, str] = {}  # what a response adds (rate-limit fields)
        self.refusal: Refusal | None = None  # a 429 or 503: why (see `refused`)

    def body(self) -> bytes:
        error: dict[str, object] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        if self.refusal is not None:
            error.update(self.refusal.fields())
        return json.dumps({"error": error}).encode()

    def retry_after(self) -> str | None:
        """The `Retry-After` value, or None."""
        if self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))

    def retry_after_ms(self) -> str | None:
        """The wait to the millisecond (`retry-after-ms`, which the openai SDKs read before
        `Retry-After`), or None."""
        if self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(round(self.retry_after_s * 1e3, 6))))


# what tells the openai SDKs (which retry a 429 or a 5xx twice by default, waiting out a
# Retry-After of up to two minutes) that asking again cannot succeed
NO_RETRY = {"x-should-retry": "false"}


class ApiError(OpenAIError):
    """An error response. `retry_after_s` becomes a `Retry-After` header (whole seconds) and
    `retry-after-ms`; a refusal that no retry can undo says so in `x-should-retry`."""

    def headers(self) -> dict[str, str]:
        headers = {**self.extra_headers, "content-type": "application/json"}
        retry_after, retry_after_ms = self.retry_after(), self.retry_after_ms()
        if retry_after is not None and retry_after_ms is not None:
            headers["retry-after"] = retry_after
            headers["retry-after-ms"] = retry_after_ms
        if self.refusal is not None and not self.refusal.retryable:
            headers.update(NO_RETRY)
        return headers


def bad_request(message: str, *, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


MAX_MESSAGE_CHARS = 1000


def openai_error_body(status: int, body: bytes) -> bytes:
    """A backend's own 4xx body, passed on, in OpenAI's shape: as it is when it is one
    already (llama.cpp's, vLLM's today: extra fields inside `error` are kept), else rebuilt
    around what it says: vLLM's older top-level `{"object": "error", "message", "type",
    "param", "code"}`, TGI's `{"error": "...", "error_type": "..."}`, or any other text."""
    try:
        data = json.loads(body)
    except ValueError:  # not JSON (nor UTF-8): the text as the message
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return body
        if isinstance(data.get("message"), str):  # vLLM before its errors nested
            return _rebuilt(
                status, data["message"], data.get("type"), data.get("param"), data.get("code")
            )
        if isinstance(error, str):  # TGI
            return _rebuilt(status, error, data.get("error_type"), None, None)
    text = " ".join(body.decode("utf-8", "replace").split())
    return _rebuilt(status, text or f"The backend answered {status}.", None, None, None)


def _rebuilt(status: int, message: str, type: object, param: object, code: object) -> bytes:
    return ApiError(
        status,
        message[:MAX_MESSAGE_CHARS],
        type=type if isinstance(type, str) and type else "invalid_request_error",
        param=param if isinstance(param, str) else None,
        code=None if code is None else str(code),
    ).body()


Number = int | float
OVERLOADED = ("server_error", "overloaded")
MAX_RETRY_AFTER_S = 86_400.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was refused (README "Rejections"): `reason` is the machine-readable
    cause (also in `x-scheduler-shed` on a 503), `limit` the knob that decided, by its config
    path (`tiers.free.max_depth`) or, for a switch or an outside cause, its name;
    `threshold` where that knob stands and `observed` what was measured against it (None
    where the knob is a switch, not a number); `retryable` whether the same request, sent
    again after `Retry-After`, can succeed."""

    reason: str
    limit: str
    threshold: Number | None = None
    observed: Number | None = None
    retryable: bool = True

    def fields(self) -> dict[str, object]:
        def number(value: Number | None, away_from: Number | None = None) -> Number | None:
            """To 3 decimals; `observed` away from the threshold it was measured against, so
            that 3.0004 over 3 reads 3.001, not 3.0."""
            if value is None or not math.isfinite(value):
                return None
            if float(value).is_integer():
                return int(value)
            shown = round(value, 3)
            if away_from is not None and value > away_from >= shown:
                return round(away_from + 0.001, 3)
            if away_from is not None and value < away_from <= shown:
                return round(away_from - 0.001, 3)
            return shown

        return {
            "reason": self.reason,
            "limit": self.limit,
            "threshold": number(self.threshold),
            "observed": number(self.observed, self.threshold),
            "retryable": self.retryable,
        }


def refused(
    status: Literal[429, 503],
    message: str,
    refusal: Refusal,
    *,
    retry_after_s: float,
    type: str | None = None,
    code: str | None = None,
) -> ApiError:
    """The one constructor of a 429 (over a quota) or a 503 (shed, or something we depend
    on is out): OpenAI's shape, `refusal`'s fields inside `error`, `Retry-After` always, and
    on a 503 the reason in `x-scheduler-shed`. A 429 defaults to OpenAI's
    `rate_limit_exceeded`, a 503 to `server_error` / `overloaded`."""
    kind, default_code = ("requests", "rate_limit_exceeded") if status == 429 else OVERLOADED
    error = ApiError(
        status,
        message,
        type=type or kind,
        code=code or default_code,
        # a day at most, and a delay that is not a number (never expected) is a second
        retry_after_s=min(retry_after_s, MAX_RETRY_AFTER_S) if retry_after_s >= 0 else 1.0,
    )
    if status == 503:
        error.extra_headers["x-scheduler-shed"] = refusal.reason
    error.refusal = refusal
    return error
