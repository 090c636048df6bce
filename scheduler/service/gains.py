"""Controller gains: their one owner in a replica, and their document in Redis.

Why one owner: the gains change from three places (the admin API, the follower that takes up
what other replicas published, SIGHUP's reload of the config file). Each used to reconfigure
the controller from its own task, so two changes in flight at once landed in whichever order
their Redis round trips ended, and an admin change built on the gains read before a reload
overwrote that reload's other gains. Now they only send their change to `GainsOwner`, whose
task is the one caller of `AIMDController.configure`: it takes the changes one at a time, in
the order they were sent, each made on the gains the one before left, published to Redis
first and applied here only once Redis took it. So the latest change taken wins: an admin
change followed by a reload of an unchanged file leaves the file's gains, everywhere; a
reload followed by an admin change leaves the file's gains with that change on top.

The document's storage, and why Redis checks a publish's deadline: `backends.redis.gains`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import coredis
import trio

from backends.redis.errors import RedisUnavailable
from backends.redis.gains import publish_gains_document, read_gains_document
from scheduler.core import AIMDConfig, AIMDController
from scheduler.service.config import gains_from_dict, gains_to_dict
from scheduler.service.metrics import GatewayMetrics

log = logging.getLogger("scheduler.service")
POLL_S = 0.5  # how often a replica looks for gains another one published
READ_TIMEOUT_S = 0.2
QUEUE = 64  # changes waiting for the owner; a sender past it waits (under its own deadline)


async def publish_gains(
    redis: coredis.Redis[Any], key: str, config: AIMDConfig, *, after: int, deadline_at: float
) -> int:
    """Write `config` as the gains document at `key`, with a version above `after` and the
    document's; return that version. Raises trio.TooSlowError (nothing written) when the
    write cannot happen by `deadline_at` (trio time), or RedisUnavailable."""
    gains_json = json.dumps(gains_to_dict(config))
    return await publish_gains_document(
        redis, key, gains_json, after=after, deadline_at=deadline_at
    )


@dataclass(eq=False, slots=True)
class _Change:
    """One change sent to the owner, and its outcome once taken."""

    make: Callable[[AIMDConfig], AIMDConfig]  # the new gains from the current ones
    deadline_at: float
    taken: trio.Event = field(default_factory=trio.Event)
    result: AIMDConfig | None = None
    error: Exception | None = None
    abandoned: bool = False  # its sender stopped waiting before the owner took it


class GainsOwner:
    """The controller's gains: the one task that changes them (see the module docstring)."""

    def __init__(
        self,
        controller: AIMDController,
        *,
        key: str,
        shared: bool,
        redis: Callable[[], coredis.Redis[bytes] | None],
        metrics: GatewayMetrics,
    ) -> None:
        self._controller = controller
        self._key = key
        self._shared = shared  # published in Redis for every replica (Redis configured)
        self._redis = redis
        self._metrics = metrics
        self._send, self._receive = trio.open_memory_channel[_Change | bytes](QUEUE)
        self._version = 0  # of the gains document last applied here
        self._rejected = b""  # the last malformed gains document seen (logged once)

    @property
    def config(self) -> AIMDConfig:
        return self._controller.config

    async def change(self, changes: Mapping[str, Any], *, deadline_at: float) -> AIMDConfig:
        """Some gains by name, over the gains current when the owner takes the change.
        Raises ValueError (a bad value, nothing applied), RedisUnavailable or
        trio.TooSlowError (Redis could not take it by `deadline_at`: applied nowhere)."""
        return await self._submit(lambda c: dataclasses.replace(c, **changes), deadline_at)

    async def replace(self, config: AIMDConfig, *, deadline_at: float) -> AIMDConfig:
        """Every gain (a reload of the config file); raises as `change` does."""
        return await self._submit(lambda _: config, deadline_at)

    async def _submit(
        self, make: Callable[[AIMDConfig], AIMDConfig], deadline_at: float
    ) -> AIMDConfig:
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

    async def _apply(self, change: _Change) -> None:
        try:
            config = change.make(self._controller.config)
            if self._shared:
                redis = self._redis()
                if redis is None:
                    raise ConnectionError("Redis is not connected")
                self._version = await publish_gains(
                    redis, self._key, config, after=self._version, deadline_at=change.deadline_at
                )
            self._controller.configure(config)
            change.result = config
        except Exception as exc:  # the sender's to handle, as if it had made the change itself
            change.error = exc
        change.taken.set()

    async def _follow(self) -> None:
        """Send the owner the gains document in Redis (another replica's admin API's)."""
        while True:
            await trio.sleep(POLL_S)
            redis = self._redis()
            if redis is None:
                continue
            try:
                raw = await read_gains_document(redis, self._key, timeout_s=READ_TIMEOUT_S)
            except RedisUnavailable:
                continue
            if raw and raw != self._rejected:
                await self._send.send(raw)

    def _take(self, raw: bytes) -> None:
        """Apply a newer gains document; a malformed one (say, written by a newer version
        with a gain this one does not know) is logged once, counted, and left alone."""
        try:
            document = json.loads(raw)
            version, config = document["version"], gains_from_dict(document["gains"])
            newer = version > self._version
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._rejected = raw
            self._metrics.gains_rejected()
            log.error("controller gains in Redis not applied (malformed: %s): %.200r", exc, raw)
            return
        if newer:
            self._controller.configure(config)
            self._version = version
