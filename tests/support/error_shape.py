"""The fields an error body's `error` object carries, by status (README "Rejections"):
OpenAI's four on every error, and on a 429 or 503 the refusal's five besides."""

from __future__ import annotations

OPENAI_FIELDS = frozenset({"message", "type", "param", "code"})
REFUSAL_FIELDS = frozenset({"reason", "limit", "threshold", "observed", "retryable"})


def error_fields(status: int) -> frozenset[str]:
    return OPENAI_FIELDS | REFUSAL_FIELDS if status in (429, 503) else OPENAI_FIELDS
