"""Errors the gateway returns, in OpenAI's shape.

    ApiError                 a response the client gets instead of a completion
    ├── caller's fault       400 invalid_request_error, 401, 404, 405, 413, 429
    └── upstream/overload    502, 503 (always with Retry-After), 504

Every error body is `{"error": {"message", "type", "param", "code"}}`; nothing else, and never
a traceback, reaches a client.
"""

from __future__ import annotations

import json
import math


class ApiError(Exception):
    """An error response. `retry_after_s` becomes a `Retry-After` header (whole seconds)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s
        self.extra_headers: dict[str, str] = {}  # e.g. the rate-limit fields

    def body(self) -> bytes:
        return json.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        ).encode()

    def headers(self) -> dict[str, str]:
        headers = {**self.extra_headers, "content-type": "application/json"}
        if self.retry_after_s is not None:
            headers["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


def bad_request(message: str, *, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def overloaded(message: str, retry_after_s: float) -> ApiError:
    return ApiError(
        503, message, type="server_error", code="overloaded", retry_after_s=retry_after_s
    )
