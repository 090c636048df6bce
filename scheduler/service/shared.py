"""A value every replica shares live: its one owner in a replica, its document in Redis.

The controller's gains (`scheduler.service.gains`) and the SRE's levers
(`scheduler.service.levers`) are such values: changed through the admin API on any replica,
taken up by every other one.

Why one owner: a value changes from several places (the admin API, the follower that takes up
what other replicas published, for the gains SIGHUP's reload of the config file). Each used
to apply its change from its own task, so two changes in flight at once landed in whichever
order their Redis round trips ended, and a change built on the value read before another
overwrote that one's other fields. Now they only send their change to `SharedValue`, whose
task is the one that applies it: it takes the changes one at a time, in the order they were
sent, each made on the value the one before left, published to Redis first and applied here
only once Redis took it. So the latest change taken wins, everywhere.

The document's storage, and why Redis checks a publish's deadline: `backends.redis.documents`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import coredis
import trio

from backends.redis.documents import publish_document, read_document
from backends.redis.errors import RedisUnavailable

log = logging.getLogger("scheduler.service")
POLL_S = 0.5  # how often a replica looks for a value another one published
READ_TIMEOUT_S = 0.2
QUEUE = 64  # changes waiting for the owner; a sender past it waits (under its own deadline)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Codec(Generic[T]):
    """How a shared value is named and written in its document: `field` holds
    `encode(value)`; `decode` raises ValueError, TypeError or KeyError on a malformed one."""

    field: str
    encode: Callable[[T], Mapping[str, Any]]
    decode: Callable[[Mapping[str, Any]], T]


@dataclass(eq=False, slots=True)
class _Change(Generic[T]):
    """One change sent to the owner, and its outcome once taken."""

    make: Callable[[T], T]  # the new value from the current one
    deadline_at: float
    taken: trio.Event = field(default_factory=trio.Event)
    result: T | None = None
    error: Exception | None = None
    abandoned: bool = False  # its sender stopped waiting before the owner took it


class SharedValue(Generic[T]):
    """A shared value's one owner in a replica (see the module docstring)."""

    def __init__(
        self,
        initial: T,
        codec: Codec[T],
        *,
        key: str,
        shared: bool,
        redis: Callable[[], coredis.Redis[bytes] | None],
        apply: Callable[[T], None] = lambda value: None,
        rejected: Callable[[], None] = lambda: None,
    ) -> None:
        self._value = initial
        self._codec = codec
        self._key = key
        self._shared = shared  # published in Redis for every replica (Redis configured)
        self._redis = redis
        self._apply_here = apply  # told each value taken, after `value` is set to it
        self._rejected_hook = rejected  # told each malformed document (once)
        self._send, self._receive = trio.open_memory_channel[_Change[T] | bytes](QUEUE)
        self._version = 0  # of the document last applied here
        self._rejected = b""  # the last malformed document seen (logged once)

    @property
    def value(self) -> T:
        return self._value

    async def change(self, make: Callable[[T], T], *, deadline_at: float) -> T:
        """`make(current)`, made on the value current when the owner takes the change.
        Raises what `make` raises (nothing applied), RedisUnavailable or trio.TooSlowError
        (Redis could not take it by `deadline_at`: applied nowhere)."""
        change = _Change(make, deadline_at)
        try:
            await self._send.send(change)
            await change.taken.wait()
        finally:
            change.abandoned = not change.taken.is_set()
        if change.error is not None:
            raise change.error
        assert change.result is not None
        return change.result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The owner's task: every change, in the order sent; follows Redis when shared."""
        async with trio.open_nursery() as nursery:
            if self._shared:
                nursery.start_soon(self._follow)
            task_status.started()
            async for message in self._receive:
                if isinstance(message, bytes):
                    self._take(message)
                elif not message.abandoned:
                    await self._apply(message)

    def _set(self, value: T) -> None:
        self._value = value
        self._apply_here(value)

    async def _apply(self, change: _Change[T]) -> None:
        try:
            value = change.make(self._value)
            if self._shared:
                redis = self._redis()
                if redis is None:
                    raise ConnectionError("Redis is not connected")
                body = json.dumps(self._codec.encode(value))
                self._version = await publish_document(
                    redis,
                    self._key,
                    self._codec.field,
                    body,
                    after=self._version,
                    deadline_at=change.deadline_at,
                )
            self._set(value)
            change.result = value
        except Exception as exc:  # the sender's to handle, as if it had made the change itself
            change.error = exc
        change.taken.set()

    async def _follow(self) -> None:
        """Send the owner the document in Redis (another replica's admin API's)."""
        while True:
            await trio.sleep(POLL_S)
            redis = self._redis()
            if redis is None:
                continue
            try:
                raw = await read_document(redis, self._key, timeout_s=READ_TIMEOUT_S)
            except RedisUnavailable:
                continue
            if raw and raw != self._rejected:
                await self._send.send(raw)

    def _take(self, raw: bytes) -> None:
        """Apply a newer document; a malformed one (say, written by a newer version with a
        field this one does not know) is logged once, counted, and left alone."""
        field_name = self._codec.field
        try:
            document = json.loads(raw)
            version, value = document["version"], self._codec.decode(document[field_name])
            newer = version > self._version
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._rejected = raw
            self._rejected_hook()
            log.error(
                "shared %s in Redis not applied (malformed: %s): %.200r", field_name, exc, raw
            )
            return
        if newer:
            self._set(value)
            self._version = version
