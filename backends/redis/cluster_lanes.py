"""The pipeliner's lanes, and on a Redis Cluster the routing of its commands to them.

A lane is a queue of commands waiting to be sent and the event that wakes its drainer. Off a
Redis Cluster there is one, every caller's (`backends.redis.pipeliner`). On a Redis Cluster
each node has a lane of its own: the commands for one node go in one round trip, the nodes'
round trips run concurrently, and a node that is slow or down holds up and fails only the
commands for its own slots. A slot being migrated between nodes answers a script of several
keys TRYAGAIN until it settles, and coredis retries such a command inside the pipeline's round
trip, holding up every other command of the node; so a slot that answered TRYAGAIN (or
redirects that did not settle) has a lane of its own for MOVING_FOR_S, and the node's other
keys are not held up by it.

Why a module of its own: which node and which lane a command goes to is a question of the
cluster's slot map alone; the pipeliner only queues, sends and times the round trips.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import coredis
import coredis.exceptions
import trio

MOVING_FOR_S = 2.0  # a slot that answered TRYAGAIN keeps a lane of its own this long
MOVING_ERRORS = (  # a command's error that means its slot is moving, not that Redis failed
    coredis.exceptions.TryAgainError,  # the slot is migrating: a script's keys on both nodes
    coredis.exceptions.AskError,
    coredis.exceptions.ClusterError,  # coredis's redirect tries ran out
)


class Queued(Protocol):
    """What routing needs of a queued command (the pipeliner's `_Pending`)."""

    command: Callable[[Any], Any]  # given the pipeline, queues one command on it
    slot: int | None  # on a Redis Cluster, the one slot its keys are in (set here)
    abandoned: bool  # its caller gave up before it was sent


P = TypeVar("P", bound=Queued)
Send = Callable[[list[P]], Awaitable[None]]  # one round trip for a batch


class Lane(Generic[P]):
    """Commands waiting to be sent: every caller's, and on a Redis Cluster each node's."""

    __slots__ = ("queue", "wakeup")

    def __init__(self) -> None:
        self.queue: list[P] = []
        self.wakeup = trio.Event()

    def take(self, max_batch: int) -> list[P]:
        """The next `max_batch` queued, less those whose callers gave up, off the queue."""
        batch = [p for p in self.queue[:max_batch] if not p.abandoned]
        del self.queue[:max_batch]
        return batch


async def drain(lane: Lane[P], send: Send[P], max_batch: int) -> None:
    """Forever: each batch of up to `max_batch` commands still wanted, to `send`."""
    while True:
        await lane.wakeup.wait()
        lane.wakeup = trio.Event()
        await send_queued(lane, send, max_batch)


async def send_queued(lane: Lane[P], send: Send[P], max_batch: int) -> None:
    while lane.queue:
        if batch := lane.take(max_batch):
            await send(batch)


class ClusterLanes(Generic[P]):
    """A Redis Cluster's lanes: (node, None) for a node's, (node, slot) for a moving slot's,
    each drained by a task of its own with one pipeline in flight at a time."""

    def __init__(self, cluster: coredis.RedisCluster[Any], send: Send[P], max_batch: int) -> None:
        self._cluster = cluster
        self._send = send
        self._max_batch = max_batch
        self._lanes: dict[tuple[str, int | None], Lane[P]] = {}
        self._moving_until: dict[int, float] = {}  # slots that answered TRYAGAIN, until when

    def route(self, batch: list[P], nursery: trio.Nursery) -> None:
        """Each command to its node's lane, so a node that is slow or down holds up and fails
        only the commands for its slots; a moving slot's commands go in a lane of their own,
        closed once it is idle."""
        now = trio.current_time()
        for name, group in self._per_node(batch, now).items():
            lane = self._lanes.get(name)
            if lane is None:  # the nodes ever seen: a few, plus one per failover
                lane = self._lanes[name] = Lane()
                if name[1] is None:
                    nursery.start_soon(drain, lane, self._send, self._max_batch)
                else:
                    nursery.start_soon(self._drain_moving, name, lane)
            lane.queue.extend(group)
            lane.wakeup.set()

    def _per_node(self, batch: list[P], now: float) -> dict[tuple[str, int | None], list[P]]:
        """The batch grouped by the node that serves each command's slot (as the client's slot
        map has it now; a command that meets MOVED or ASK is redirected by coredis), a moving
        slot's apart."""
        probe: Any = self._cluster.pipeline(transaction=False)
        layout = self._cluster.connection_pool.cluster_layout
        groups: dict[tuple[str, int | None], list[P]] = {}
        for p in batch:
            p.command(probe)
            request = probe.command_stack[-1]
            try:
                name = layout.node_for_request(request).name
            except coredis.exceptions.RedisError:
                name = ""  # no single slot: its own pipeline, where coredis raises the error
            slots = request.affected_slots
            p.slot = slots[0] if len(slots) == 1 else None
            moving = p.slot if self.moving(p.slot, now) else None
            groups.setdefault((name, moving), []).append(p)
        return groups

    def moving(self, slot: int | None, now: float | None = None) -> bool:
        """Whether `slot` answered TRYAGAIN (or unsettled redirects) within MOVING_FOR_S."""
        if slot is None:
            return False
        return self._moving_until.get(slot, -math.inf) > (
            trio.current_time() if now is None else now
        )

    def command_failed(self, slot: int | None, error: BaseException) -> None:
        """A command on `slot` failed with `error`: if the slot is moving, its commands get a
        lane of their own for MOVING_FOR_S."""
        if isinstance(error, MOVING_ERRORS) and slot is not None:
            self._moving_until[slot] = trio.current_time() + MOVING_FOR_S

    async def _drain_moving(self, name: tuple[str, int | None], lane: Lane[P]) -> None:
        """A moving slot's lane: drained like a node's until the slot has settled and nothing
        is queued, then closed (later commands for the slot go to its node's lane again)."""
        _, slot = name
        assert slot is not None
        send = partial(send_queued, lane, self._send, self._max_batch)
        while lane.queue or self.moving(slot):
            with trio.move_on_at(self._moving_until.get(slot, -math.inf)):
                await lane.wakeup.wait()
            lane.wakeup = trio.Event()
            await send()
        self._moving_until.pop(slot, None)
        del self._lanes[name]

    def suspect_layout(self) -> None:
        """A round trip failed: tell the client, whose layout monitor then reads the slot map
        again (after a failover, the promoted replica serves the slots). coredis counts the
        errors of single commands itself, not those of pipelines."""
        error = coredis.exceptions.ConnectionError("a pipeline round trip failed")
        self._cluster.connection_pool.cluster_layout.report_errors(None, error)
