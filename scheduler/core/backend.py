"""The `Backend` role: the model's backends as the gateway uses them.

Why a role: the gateway decides from how busy and healthy a model's backends are, and carries
a call to one of them; it does not care that the implementation (`backends.http.pool.
BackendPool`, least in flight first over HTTP/1.1 clients) speaks HTTP. A `Backend` raises the
`BackendError` tree (`scheduler/errors.py`), never a transport's own exceptions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol


class BackendResponse(Protocol):
    """A backend's answer, streamed: read `status_code` and the headers, then the body once."""

    deadline_at: float  # every read of the body ends by then (or raises), set as it goes

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """Every header as sent (names in lower case)."""
        ...

    def end_to_end_headers(self) -> dict[str, str]:
        """The headers a proxy passes on (not the hop-by-hop ones, nor CORS)."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body, piece by piece as it arrives."""
        ...

    async def read(self) -> bytes:
        """The whole body (bounded in size by the implementation)."""
        ...


class Backend(Protocol):
    """The backends of one model."""

    @property
    def inflight(self) -> int:
        """Calls on their way now, over every backend."""
        ...

    @property
    def any_healthy(self) -> bool:
        """Whether a call could be sent now."""
        ...

    def post(
        self, path: str, body: bytes, headers: dict[str, str], *, timeout_s: float | None = None
    ) -> AbstractAsyncContextManager[BackendResponse]:
        """POST `body` to one backend; the response is open inside the context."""
        ...
