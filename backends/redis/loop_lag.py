"""How far behind this process's event loop has been, for waits timed on Redis's clock.

Why: a deadline also passes while our own event loop is behind (a CPU-bound burst, a
collector pause), and a reply that came back in a millisecond then sits unread in the socket.
The pipeliner (`backends.redis.pipeliner`) extends a wait by the loop lag since it began, so
that under CPU saturation a call is slower, not failed.
"""

from __future__ import annotations

import math

import trio

LAG_TICK_S = 0.005  # how often LoopLag looks: a late wake-up of this task is the loop's lag


class LoopLag:
    """How far behind this process's event loop has been: the sum of how late a task that
    sleeps `tick_s` at a time woke up (`total_s`, only growing). Start `run` in a nursery."""

    def __init__(self, tick_s: float = LAG_TICK_S) -> None:
        self.tick_s = tick_s
        self.total_s = 0.0
        self.ticked_at = -math.inf
        self._ticked = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            asleep_at = trio.current_time()
            await trio.sleep(self.tick_s)
            self.ticked_at = trio.current_time()
            self.total_s += max(0.0, self.ticked_at - asleep_at - self.tick_s)
            self._ticked.set()
            self._ticked = trio.Event()

    async def wait_ticked_after(self, at: float) -> None:
        """Wait until `total_s` accounts for the loop up to time `at` (a tick after it)."""
        while self.ticked_at < at:
            await self._ticked.wait()
