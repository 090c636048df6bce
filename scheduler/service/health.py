"""Redis's health as this replica sees it, and one log line per change of it.

Why a ping as well as the breaker: the breaker reflects what requests met (it opens after a
few failed calls), but it changes only when requests call Redis, so with no traffic it would
notice neither a Redis that went away nor one that came back (an open breaker stays open
until the next call). A ping every `interval_s` covers the quiet times. Redis counts as up
when the last ping answered and the breaker is not holding calls off (closed, or with its
probe time passed: the next call will try Redis anyway). On a Redis Cluster each primary is
pinged, on a client of its own kept open from ping to ping, and each shard has its breaker:
Redis is up while one shard is (`shards_down` says how many are not), since a dead shard
stops only the keys on its own slots.

`observe(now=...)` decides the state and logs a change, once: WARNING for "unreachable at
start-up" and "lost", INFO for "back". The replica calls it on the dispatcher's tick. Neither
the URL (it may hold a password) nor anything of a request is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import coredis
import trio

from backends.redis.errors import RedisUnavailable, translated_redis_errors
from policies.breaker import BreakerState, ScopedBreakers

log = logging.getLogger("scheduler.service.redis")
PING_INTERVAL_S = 0.5
PING_TIMEOUT_S = 0.2


class RedisHealth:
    """Whether Redis can be used now; owned by the replica (pinged by `watch`)."""

    def __init__(
        self,
        breakers: ScopedBreakers,
        *,
        interval_s: float = PING_INTERVAL_S,
        timeout_s: float = PING_TIMEOUT_S,
    ) -> None:
        self._breakers = breakers
        self.shards_down = 0  # Redis Cluster primaries that did not answer the last ping
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._ping_error: str | None = "not pinged yet"
        self._pinged = False
        self._logged_up: bool | None = None  # None: nothing logged yet
        # a Redis Cluster's primaries, by name: a client each, and its holder task's scope
        self._nodes: dict[str, tuple[coredis.Redis[Any], trio.CancelScope]] = {}

    async def watch(
        self,
        redis: Callable[[], coredis.Redis[Any] | None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Ping `redis()` now (reported started after it), then every `interval_s`."""
        async with trio.open_nursery() as holders:
            await self._ping(redis(), holders)
            task_status.started()
            while True:
                await trio.sleep(self._interval_s)
                await self._ping(redis(), holders)

    async def _ping(self, redis: coredis.Redis[Any] | None, holders: trio.Nursery) -> None:
        if redis is None:  # the client is being closed (shutting down): no news
            return
        if isinstance(redis, coredis.RedisCluster):
            nodes, count = await self._primaries(redis, holders)
        else:
            nodes, count = [redis], 1
        errors: list[str] = []
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(self._ping_node, node, errors)
        errors += ["not connected"] * (count - len(nodes))
        self.shards_down = len(errors) if count > 1 else 0
        # a cluster is up while one shard answers: a dead shard stops only its own keys
        self._ping_error = errors[0] if len(errors) >= count else None
        self._pinged = True

    async def _primaries(
        self, cluster: coredis.RedisCluster[Any], holders: trio.Nursery
    ) -> tuple[list[coredis.Redis[Any]], int]:
        """A client per primary of the slot map, kept from ping to ping (one connection each,
        not one a ping), and how many primaries the map has (a client may have failed to
        open); a node no longer a primary has its client closed."""
        wanted = {node.name: node for node in cluster.connection_pool.cluster_layout.primaries}
        for name in [name for name in self._nodes if name not in wanted]:
            self._nodes.pop(name)[1].cancel()
        for name, node in wanted.items():
            if name not in self._nodes:
                client = node.as_client(**cluster.connection_pool.connection_kwargs)
                with trio.move_on_after(self._timeout_s):
                    await holders.start(self._hold, name, client)
        return [client for client, _ in self._nodes.values()], len(wanted)

    async def _hold(
        self, name: str, client: coredis.Redis[Any], *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Keep `client` open (coredis: entered and left by one task) until cancelled, or until
        it fails: then the next ping opens another."""
        started = False
        with trio.CancelScope() as scope:
            try:
                with translated_redis_errors():  # a client's failures surface grouped
                    async with client:
                        self._nodes[name] = (client, scope)
                        task_status.started()
                        started = True
                        await trio.sleep_forever()
            except* RedisUnavailable:
                pass
            finally:
                if self._nodes.get(name, (None, None))[1] is scope:
                    del self._nodes[name]
        if not started:  # it failed at once: this ping counts the node as not connected
            task_status.started()

    async def _ping_node(self, node: coredis.Redis[Any], errors: list[str]) -> None:
        try:
            with translated_redis_errors(), trio.fail_after(self._timeout_s):
                await node.ping()
        except RedisUnavailable as exc:
            errors.append(exc.kind)

    def error(self, *, now: float) -> str | None:
        """Why Redis is not usable at `now`, or None when it is."""
        if self._ping_error is not None:
            return self._ping_error
        scopes = self._breakers.statistics().values()
        if not scopes or any(
            s.state is BreakerState.CLOSED or (s.probe_at is not None and now >= s.probe_at)
            for s in scopes
        ):
            return None
        return f"calls failing (breaker {self._breakers.state.value})"

    def observe(self, *, now: float) -> None:
        """Log a change of state since the last call, once."""
        if not self._pinged:
            return
        error = self.error(now=now)
        up = error is None
        if up == self._logged_up or (up and self._logged_up is None):
            self._logged_up = up
            return
        if self._logged_up is None:
            log.warning(
                "Redis unreachable at start-up (%s): each tier follows its fail_mode", error
            )
        elif up:
            log.info("Redis back: quotas are decided by Redis again")
        else:
            log.warning("Redis lost (%s): each tier follows its fail_mode", error)
        self._logged_up = up
