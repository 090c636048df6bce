"""The OpenAI API's error shape, shared by the gateway's errors and the demo backend's.

    OpenAIError              the shape; the demo backend's errors are these
    └── ApiError             a response the gateway's client gets instead of a completion
        ├── caller's fault       400 invalid_request_error, 401, 404, 405, 413, 429
        └── upstream/overload    502, 503 (always with Retry-After), 504

Every error body is `{"error": {"message", "type", "param", "code"}}`; `retry_after_s`
becomes a `Retry-After` header in whole seconds, at least 1.
"""

from __future__ import annotations

import json
import math

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

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode()

    def retry_after(self) -> str | None:
        """The `Retry-After` value, or None."""
        if self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))


class ApiError(OpenAIError):
    """An error response. `retry_after_s` becomes a `Retry-After` header (whole seconds)."""

    def headers(self) -> dict[str, str]:
        headers = {**self.extra_headers, "content-type": "application/json"}
        retry_after = self.retry_after()
        if retry_after is not None:
            headers["retry-after"] = retry_after
        return headers


def bad_request(message: str, *, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def overloaded(message: str, retry_after_s: float) -> ApiError:
    return ApiError(
        503, message, type="server_error", code="overloaded", retry_after_s=retry_after_s
    )
