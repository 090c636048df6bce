"""Redis commands from concurrent callers, sent together: one pipeline per round trip.

Why: on trio a coredis call costs about 200 us of this process's CPU, and a command inside a
pipeline about 30 us (bench/RESULTS.md). Under load many requests wait on Redis at once, so
every command queued while the round trips in flight were out goes as one non-transactional
pipeline, and each caller gets its own reply or error. A caller alone is sent at once. Off a
Redis Cluster, up to `round_trips` (4) round trips are in flight together, each on a
connection of its own: a command queued while one is out is sent at once, not after it. With
one round trip at a time (as before), every command waited for the round trip in flight, and
the callers of one round trip were all released together: 500 clients in front of a backend
answering in 500 ms moved through the gateway in clumps that the backend handed back together
500 ms later, and each answer waited in the queue of its whole clump (0.73-0.78 of the ideal
rate, where the same gateway without the quota served 0.97; bench/RESULTS.md, "500
clients"). On a Redis Cluster each node has a lane of its own, and a moving slot one apart
(`backends.redis.cluster_lanes`). A pipeline is not a transaction: each command is atomic on
its own (the Lua scripts are), exactly as when sent alone.

Callers keep their own deadlines. A caller that gives up before its command is sent takes
it back; one that gives up later leaves the reply unread, and the command may still run, as
a command whose reply comes late always could. Errors: a command's own error is raised to
its caller; when the whole round trip fails, every caller in it gets a fresh
`coredis.exceptions.ConnectionError` (or `trio.TooSlowError` if it took longer than
`timeout_s`), so callers translate them as they would a direct call's.

A caller may bound its wait (`timeout_s`) on Redis's time, not on this process's (for a
moving slot, a wait that runs out raises `TryAgainError`: the move, not Redis's health): a
deadline also passes while our own event loop is behind (a CPU-bound burst, a collector
pause), and a reply that came back in a millisecond then sits unread in the socket. So
`LoopLag`, a task that sleeps in short ticks, sums how late each tick wakes; a wait whose
deadline passes is extended by the loop lag since it began, and fails (`trio.TooSlowError`)
only when Redis had its whole `timeout_s` of time the loop was there to read the reply, or
when the pipeliner's own round trip timeout ran out. The clock of a command queued behind
other round trips starts when it is sent, or when Redis last answered if that is later
(`_wait_answered`). A Redis that stops answering is still found out in `timeout_s` while
the loop keeps up; under CPU saturation a call is slower, not failed.

Scripts go as EVALSHA (coredis would check every script with SCRIPT EXISTS first, a round
trip per pipeline); a script Redis no longer knows (a restart, SCRIPT FLUSH) is sent once
more on its own, which loads it. Off a Redis Cluster they go on a connection of the
pipeliner's own (`backends.redis.resp`: one write and one read per batch, in this task,
without coredis's per-command cost), the other commands of the batch through coredis.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import coredis
import coredis.exceptions
import trio
from coredis.commands.script import Script

from backends.redis.cluster_lanes import ClusterLanes, Lane, Send, drain
from backends.redis.loop_lag import LoopLag
from backends.redis.resp import RawCommand, RespConnection

Command = Callable[[Any], Any]  # given the pipeline, queues one command on it
ROUND_TRIPS = 4  # off a Redis Cluster: round trips in flight at once, a connection each


OnError = Callable[[BaseException], None]


class _Pending:
    __slots__ = (
        "abandoned",
        "command",
        "done",
        "error",
        "lag_at_send_s",
        "on_error",
        "raw",
        "reply",
        "sent_at",
        "slot",
    )

    def __init__(
        self, command: Command, on_error: OnError | None = None, raw: RawCommand | None = None
    ) -> None:
        self.command = command
        self.raw = raw  # the same command in RESP's terms, for the own connection
        self.slot: int | None = None  # on a Redis Cluster, the one slot its keys are in
        self.done = trio.Event()
        self.reply: Any = None
        self.error: BaseException | None = None
        self.abandoned = False
        self.on_error = on_error  # `execute_soon`'s: nobody waits on `done`
        self.sent_at: float | None = None  # when its round trip began
        self.lag_at_send_s = 0.0  # `LoopLag.total_s` then

    def finish(self, reply: Any = None, error: BaseException | None = None) -> None:
        """The command's outcome, once (a later one is ignored)."""
        if self.done.is_set():
            return
        self.reply, self.error = reply, error
        self.done.set()
        if error is not None and self.on_error is not None:
            self.on_error(error)

    def fail(self, error: BaseException) -> None:
        self.finish(error=error)

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.reply


class RedisPipeliner:
    """Start `run` in a nursery, then `execute` from any task."""

    def __init__(
        self,
        redis: coredis.Redis[Any],
        *,
        max_batch: int = 256,
        timeout_s: float = 2.0,
        round_trips: int = ROUND_TRIPS,
    ) -> None:
        if max_batch < 1 or not timeout_s > 0 or round_trips < 1:
            raise ValueError("max_batch and round_trips must be >= 1 and timeout_s > 0")
        self.redis = redis
        self._max_batch = max_batch
        self._round_trips = round_trips
        self._timeout_s = timeout_s
        self._front: Lane[_Pending] = Lane()  # queued, not yet sent (or routed to a node)
        self._cluster: ClusterLanes[_Pending] | None = None
        if isinstance(redis, coredis.RedisCluster):
            self._cluster = ClusterLanes(redis, partial(self._send_pipeline, None), max_batch)
        self.lag = LoopLag()
        self._answered_at = -math.inf  # when the last round trip came back (or failed)
        self._nursery: trio.Nursery | None = None  # `run`'s
        self.round_trips = 0
        self.commands = 0
        self.own_commands = 0  # of `commands`, those sent on the own connection

    def execute_soon(self, command: Command, on_error: OnError) -> None:
        """Queue `command(pipeline)` and return at once: its reply is dropped and a failure
        goes to `on_error` (called from the pipeliner's task), as for a write nobody waits
        for (a quota's settlement), which then costs no task of the caller's. A script Redis
        no longer knows is sent again on its own, as by `evalsha`."""
        self._queue([_Pending(command, on_error)])

    def evalsha_soon(
        self, script: Script[Any], keys: Sequence[Any], args: Sequence[Any], on_error: OnError
    ) -> None:
        """`evalsha` without waiting (`execute_soon`)."""

        def failed(error: BaseException) -> None:
            if isinstance(error, coredis.exceptions.NoScriptError) and self._nursery is not None:
                self._nursery.start_soon(self._load_and_run, script, keys, args, on_error)
            else:
                on_error(error)

        self._queue([_Pending(_evalsha(script, keys, args), failed, _raw(script, keys, args))])

    def _queue(self, pending: list[_Pending]) -> None:
        self._front.queue.extend(pending)
        self._front.wakeup.set()

    async def _load_and_run(
        self, script: Script[Any], keys: Sequence[Any], args: Sequence[Any], on_error: OnError
    ) -> None:
        try:
            with trio.fail_after(self._timeout_s):
                await script(keys=keys, args=args)
        except Exception as exc:
            on_error(exc)

    async def execute(self, command: Command, *, timeout_s: float | None = None) -> Any:
        """Queue `command(pipeline)` and return its reply (see `execute_each`)."""
        return (await self.execute_each([command], timeout_s=timeout_s))[0]

    async def execute_each(
        self, commands: Sequence[Command], *, timeout_s: float | None = None
    ) -> list[Any]:
        """Queue the commands together (one round trip, unless a batch fills up between
        them); their replies, in order. With `timeout_s`, raise `trio.TooSlowError` when
        Redis has not answered within that much of its own time (the module docstring)."""
        return await self._wait_for([_Pending(command) for command in commands], timeout_s)

    async def _wait_for(self, pending: list[_Pending], timeout_s: float | None) -> list[Any]:
        self._queue(pending)
        try:
            if timeout_s is None:
                for p in pending:
                    await p.done.wait()
            else:
                await self._wait_answered(pending, timeout_s)
        except BaseException:
            for p in pending:
                p.abandoned = True
            raise
        return [p.unwrap() for p in pending]

    async def _wait_answered(self, pending: list[_Pending], timeout_s: float) -> None:
        """Wait for every reply, for `timeout_s` from when its command was sent plus the
        loop's lag meanwhile, and never longer than the round trip's own timeout from now.
        A command still queued behind other round trips (a burst of thousands of callers
        takes several) waits on this process, not on Redis: while round trips keep coming
        back, its clock has not started; it runs from the last one back (so a Redis that
        stops answering fails the queued commands too, `timeout_s` after its last answer)."""
        waiting_at, lag_at_wait_s = trio.current_time(), self.lag.total_s
        last_at = waiting_at + self._timeout_s

        def deadline(p: _Pending) -> float:
            if p.sent_at is None:
                since = max(waiting_at, self._answered_at)
                return since + timeout_s + self.lag.total_s - lag_at_wait_s
            return p.sent_at + timeout_s + self.lag.total_s - p.lag_at_send_s

        for p in pending:
            while not p.done.is_set():
                with trio.move_on_at(min(deadline(p), last_at)):
                    await p.done.wait()
                    break
                # the deadline passed: first let the lag monitor see the loop up to now
                with trio.move_on_at(last_at):
                    await self.lag.wait_ticked_after(trio.current_time())
                if not p.done.is_set() and min(deadline(p), last_at) <= trio.current_time():
                    if self._cluster is not None and self._cluster.moving(p.slot):
                        # held up by coredis's retries of TRYAGAIN
                        raise coredis.exceptions.TryAgainError("the key's slot is migrating")
                    raise trio.TooSlowError

    async def evalsha(
        self,
        script: Script[Any],
        keys: Sequence[Any],
        args: Sequence[Any],
        *,
        timeout_s: float | None = None,
    ) -> Any:
        """Run `script` in a pipeline; on NOSCRIPT, once more on its own (which loads it)."""
        pending = _Pending(_evalsha(script, keys, args), raw=_raw(script, keys, args))
        try:
            return (await self._wait_for([pending], timeout_s))[0]
        except coredis.exceptions.NoScriptError:  # Redis answers: bounded as a round trip
            with trio.fail_after(self._timeout_s):
                return await script(keys=keys, args=args)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.lag.run)
            task_status.started()
            if self._cluster is not None:
                cluster = self._cluster

                async def route(batch: list[_Pending]) -> None:
                    cluster.route(batch, nursery)

                await drain(self._front, route, self._max_batch)
            else:
                await self._drain_together(self._front)

    async def _drain_together(self, lane: Lane[_Pending]) -> None:
        """Off a Redis Cluster: `round_trips` tasks drain the lane, each with a connection of
        its own for the scripts (None: a client this module cannot open one for)."""
        owns = [RespConnection.for_client(self.redis) for _ in range(self._round_trips)]
        try:
            async with trio.open_nursery() as senders:
                for own in owns:
                    senders.start_soon(self._drain_shared, lane, partial(self._send_pipeline, own))
        finally:
            # shielded: under a cancellation, closing one (a checkpoint) would raise and skip
            # the rest, left open until a garbage collection; closing is forceful, never waits
            with trio.CancelScope(shield=True):
                for own in owns:
                    if own is not None:
                        await own.aclose()

    async def _drain_shared(self, lane: Lane[_Pending], send: Send[_Pending]) -> None:
        """One of the tasks that drain `lane`: whichever is not waiting on a round trip sends
        what is queued (one that wakes to an empty queue waits again)."""
        while True:
            if not lane.queue:
                if lane.wakeup.is_set():
                    lane.wakeup = trio.Event()
                await lane.wakeup.wait()
                continue
            if batch := lane.take(self._max_batch):
                await send(batch)

    async def _send_pipeline(self, own: RespConnection | None, batch: list[_Pending]) -> None:
        """One round trip: the scripts on `own` (None: through coredis too), the rest through
        coredis."""
        self.round_trips += 1
        self.commands += len(batch)
        now, lag_s = trio.current_time(), self.lag.total_s
        for p in batch:
            p.sent_at, p.lag_at_send_s = now, lag_s
        try:
            with trio.fail_after(self._timeout_s):
                # in the order queued: each run of scripts on the own connection, the rest
                # through coredis (a caller's command and its script on a key stay in order)
                for raw, run in itertools.groupby(batch, lambda p: p.raw is not None):
                    if raw and own is not None:
                        await self._send_own(own, list(run))
                    else:
                        await self._send_coredis(list(run))
        except trio.TooSlowError:
            self._suspect_layout()
            for p in batch:
                p.fail(trio.TooSlowError())
        except Exception as exc:
            self._suspect_layout()
            for p in batch:
                error = coredis.exceptions.ConnectionError(f"the pipeline failed: {exc!r}")
                error.__cause__ = exc
                p.fail(error)
        finally:
            self._answered_at = trio.current_time()
            for p in batch:  # cancelled (shutting down): the callers see a timeout
                p.fail(trio.TooSlowError())

    def _suspect_layout(self) -> None:
        if self._cluster is not None:
            self._cluster.suspect_layout()

    async def _send_own(self, own: RespConnection, batch: list[_Pending]) -> None:
        self.own_commands += len(batch)
        replies = await own.round_trip([p.raw for p in batch if p.raw is not None])
        for p, reply in zip(batch, replies, strict=True):
            if isinstance(reply, coredis.exceptions.RedisError):
                p.finish(error=reply)  # this command's own error
            else:
                p.finish(reply)

    async def _send_coredis(self, batch: list[_Pending]) -> None:
        async with self.redis.pipeline(transaction=False, raise_on_error=False) as pipe:
            requests = [p.command(pipe) for p in batch]
        for p, request in zip(batch, requests, strict=True):
            try:
                reply = await request  # ready: the pipeline has run
            except Exception as exc:  # this command's own error
                if self._cluster is not None:
                    self._cluster.command_failed(p.slot, exc)
                p.finish(error=exc)
            else:
                p.finish(reply)


def _evalsha(script: Script[Any], keys: Sequence[Any], args: Sequence[Any]) -> Command:
    def command(pipe: Any) -> Any:
        return pipe.evalsha(script.sha, keys=keys, args=args)

    return command


def _raw(script: Script[Any], keys: Sequence[Any], args: Sequence[Any]) -> RawCommand:
    return (b"EVALSHA", script.sha, len(keys), *keys, *args)
