"""Controller gains: their one owner in a replica, and their document in Redis.

The gains change from three places: the admin API, the follower that takes up what other
replicas published, and SIGHUP's reload of the config file. They are a shared value
(`scheduler.service.shared`): changes apply one at a time, in the order sent, each on the
gains the one before left, published to Redis first and applied here only once Redis took it,
so the latest change taken wins: an admin change followed by a reload of an unchanged file
leaves the file's gains, everywhere; a reload followed by an admin change leaves the file's
gains with that change on top. Its task is the one caller of `AIMDController.configure`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

import coredis
import trio

from backends.redis.documents import publish_document
from scheduler.core import AIMDConfig, AIMDController
from scheduler.service.config import gains_from_dict, gains_to_dict
from scheduler.service.metrics import GatewayMetrics
from scheduler.service.shared import Codec, SharedValue

GAINS: Codec[AIMDConfig] = Codec("gains", gains_to_dict, gains_from_dict)


async def publish_gains(
    redis: coredis.Redis[Any], key: str, config: AIMDConfig, *, after: int, deadline_at: float
) -> int:
    """Write `config` as the gains document at `key`, with a version above `after` and the
    document's; return that version. Raises trio.TooSlowError (nothing written) when the
    write cannot happen by `deadline_at` (trio time), or RedisUnavailable."""
    body = json.dumps(gains_to_dict(config))
    return await publish_document(
        redis, key, GAINS.field, body, after=after, deadline_at=deadline_at
    )


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
        self.document = SharedValue(
            controller.config,
            GAINS,
            key=key,
            shared=shared,
            redis=redis,
            apply=controller.configure,
            rejected=metrics.gains_rejected,
        )

    @property
    def config(self) -> AIMDConfig:
        return self._controller.config

    async def change(self, changes: Mapping[str, Any], *, deadline_at: float) -> AIMDConfig:
        """Some gains by name, over the gains current when the owner takes the change.
        Raises ValueError (a bad value, nothing applied), RedisUnavailable or
        trio.TooSlowError (Redis could not take it by `deadline_at`: applied nowhere)."""
        return await self.document.change(
            lambda c: dataclasses.replace(c, **changes), deadline_at=deadline_at
        )

    async def replace(self, config: AIMDConfig, *, deadline_at: float) -> AIMDConfig:
        """Every gain (a reload of the config file); raises as `change` does."""
        return await self.document.change(lambda _: config, deadline_at=deadline_at)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The owner's task (`SharedValue.run`)."""
        await self.document.run(task_status=task_status)
