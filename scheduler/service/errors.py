"""Errors the gateway returns, in OpenAI's shape.

    ApiError                 a response the client gets instead of a completion
    ├── caller's fault       400 invalid_request_error, 401, 404, 405, 413, 429
    └── upstream/overload    502, 503 (always with Retry-After), 504

Every error body is `{"error": {"message", "type", "param", "code"}}`; nothing else, and never
a traceback, reaches a client.
"""

from __future__ import annotations

from backends.openai_errors import OpenAIError


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
