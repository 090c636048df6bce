"""Redis commands from concurrent callers, sent together: one pipeline per round trip.

Why: on trio a coredis call costs about 200 us of this process's CPU, and a command inside a
pipeline about 30 us (bench/RESULTS.md). Under load many requests wait on Redis at once, so
one task sends every command queued while the previous round trip was out as one
non-transactional pipeline and hands each caller its own reply or error. A caller alone is
sent at once. A pipeline is not a transaction: each command is atomic on its own (the Lua
scripts are), exactly as when sent alone.

Callers keep their own deadlines. A caller that gives up before its command is sent takes
it back; one that gives up later leaves the reply unread, and the command may still run, as
a command whose reply comes late always could. Errors: a command's own error is raised to
its caller; when the whole round trip fails, every caller in it gets a fresh
`coredis.exceptions.ConnectionError` (or `trio.TooSlowError` if it took longer than
`timeout_s`), so callers translate them as they would a direct call's.

Scripts go as EVALSHA (coredis would check every script with SCRIPT EXISTS first, a round
trip per pipeline); a script Redis no longer knows (a restart, SCRIPT FLUSH) is sent once
more on its own, which loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import coredis
import coredis.exceptions
import trio
from coredis.commands.script import Script

Command = Callable[[Any], Any]  # given the pipeline, queues one command on it


class _Pending:
    __slots__ = ("abandoned", "command", "done", "error", "reply")

    def __init__(self, command: Command) -> None:
        self.command = command
        self.done = trio.Event()
        self.reply: Any = None
        self.error: BaseException | None = None
        self.abandoned = False

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.reply


class RedisPipeliner:
    """Start `run` in a nursery, then `execute` from any task."""

    def __init__(
        self, redis: coredis.Redis[Any], *, max_batch: int = 256, timeout_s: float = 2.0
    ) -> None:
        if max_batch < 1 or not timeout_s > 0:
            raise ValueError("max_batch must be >= 1 and timeout_s > 0")
        self.redis = redis
        self._max_batch = max_batch
        self._timeout_s = timeout_s
        self._queue: list[_Pending] = []
        self._wakeup = trio.Event()
        self.round_trips = 0
        self.commands = 0

    async def execute(self, command: Command) -> Any:
        """Queue `command(pipeline)` and return its reply."""
        return (await self.execute_each([command]))[0]

    async def execute_each(self, commands: Sequence[Command]) -> list[Any]:
        """Queue the commands together (one round trip, unless a batch fills up between
        them); their replies, in order."""
        pending = [_Pending(command) for command in commands]
        self._queue.extend(pending)
        self._wakeup.set()
        try:
            for p in pending:
                await p.done.wait()
        except BaseException:
            for p in pending:
                p.abandoned = True
            raise
        return [p.unwrap() for p in pending]

    async def evalsha(self, script: Script[Any], keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run `script` in a pipeline; on NOSCRIPT, once more on its own (which loads it)."""
        try:
            return await self.execute(lambda pipe: pipe.evalsha(script.sha, keys=keys, args=args))
        except coredis.exceptions.NoScriptError:
            with trio.fail_after(self._timeout_s):
                return await script(keys=keys, args=args)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self._queue:
                batch = [p for p in self._queue[: self._max_batch] if not p.abandoned]
                del self._queue[: self._max_batch]
                if batch:
                    await self._send(batch)

    async def _send(self, batch: list[_Pending]) -> None:
        self.round_trips += 1
        self.commands += len(batch)
        try:
            with trio.fail_after(self._timeout_s):
                async with self.redis.pipeline(transaction=False, raise_on_error=False) as pipe:
                    requests = [p.command(pipe) for p in batch]
            for p, request in zip(batch, requests, strict=True):
                try:
                    p.reply = await request  # ready: the pipeline has run
                except Exception as exc:  # this command's own error
                    p.error = exc
                p.done.set()
        except trio.TooSlowError:
            for p in batch:
                p.fail(trio.TooSlowError())
        except Exception as exc:
            for p in batch:
                error = coredis.exceptions.ConnectionError(f"the pipeline failed: {exc!r}")
                error.__cause__ = exc
                p.fail(error)
        finally:
            for p in batch:  # cancelled (shutting down): the callers see a timeout
                p.fail(trio.TooSlowError())
