"""Redis's failures in the project's terms: the one place coredis's exceptions are translated
for the callers that hold a Redis client themselves (the quota store and the response cache
translate theirs into `QuotaStoreError` and `CacheError`).

    RedisUnavailable     Redis refused, reset, timed out or answered with an error
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import coredis.exceptions
import trio

from scheduler.errors import SchedulerError

# what a call on a coredis client raises when Redis is gone, late or refusing
_FOREIGN = (coredis.exceptions.RedisError, OSError, trio.TooSlowError)


class RedisUnavailable(SchedulerError):
    """Redis could not do what was asked now; `kind` names what coredis or the OS raised."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@contextmanager
def translated_redis_errors() -> Iterator[None]:
    """Raise `RedisUnavailable` from a Redis failure inside the block. A client's failures
    surface in its own nursery, grouped: a group of them alone becomes one `RedisUnavailable`;
    in a group with others (a `Cancelled`), they are replaced by one, the others kept (for
    `except*`)."""
    try:
        yield
    except _FOREIGN as exc:
        raise RedisUnavailable(f"redis failed: {exc!r}", kind=type(exc).__name__) from exc
    except BaseExceptionGroup as group:
        foreign, rest = group.split(_FOREIGN)
        if foreign is None:
            raise
        first = _first_leaf(foreign)
        unavailable = RedisUnavailable(f"redis failed: {first!r}", kind=type(first).__name__)
        if rest is None:
            raise unavailable from foreign
        raise BaseExceptionGroup(group.message, [*rest.exceptions, unavailable]) from group


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
