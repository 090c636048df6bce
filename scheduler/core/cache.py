"""The `Cache` role: the response cache as the gateway uses it, and its hit.

Why a role: the gateway serves a shed request from an earlier answer to the same question;
where answers are kept (Redis, shared by the replicas: `backends.redis.cache.ResponseCache`)
is the implementation's business. A `Cache` raises the `CacheError` tree
(`scheduler/errors.py`), which the gateway takes for a miss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class CacheHit:
    """A cached response: `stale` once past its fresh time; `age_s` since it was stored."""

    body: bytes
    content_type: str
    stale: bool
    age_s: float


class Cache(Protocol):
    """Answers kept by who may read them (`scope`) and what was asked (`route`, `body`);
    times are wall-clock unix seconds, one clock for every replica."""

    @property
    def max_bytes(self) -> int:
        """The largest response kept (a larger one is not stored)."""
        ...

    async def get(
        self, scope: str, route: str, body: Mapping[str, Any], *, now_unix: float
    ) -> CacheHit | None:
        """The answer kept for this request, fresh or stale, or None."""
        ...

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
        """Keep `response`: fresh for `fresh_s`, then served stale for `stale_s`."""
        ...
