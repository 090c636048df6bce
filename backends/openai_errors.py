"""The OpenAI API's error shape, shared by the gateway's errors and the demo backend's.

Every error body is `{"error": {"message", "type", "param", "code"}}`; `retry_after_s`
becomes a `Retry-After` header in whole seconds, at least 1.
"""

from __future__ import annotations

import json
import math


class OpenAIError(Exception):
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
