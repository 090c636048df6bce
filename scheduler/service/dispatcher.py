"""The dispatcher: the scheduling core's one owner in a replica, and its timer.

Handlers call the core directly, through this object: trio runs one task at a time and the
core's methods never await, so a call is never interleaved with another, and an arrival that
finds room is admitted within its own call (no hop through another task: that hop cost a
request ~24 us where the core's decision costs ~2 us). What needs time to pass is the task
`run`: it sleeps until the next queued request's deadline, the gate's refill (rate mode) or
the controller's tick (`tick_s`), whichever is first, and is woken early when a request is
queued (its deadline may be the next one). A request queued is admitted by whichever call
frees the room (a `finish`, a tick that raises the limit) and its handler woken.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio

from scheduler.core import (
    Admit,
    Queued,
    Request,
    Sample,
    Scheduler,
    Shed,
    Ticket,
)


class Waiter:
    """A handler's seat: set once with the request's `Admit` or `Shed`."""

    __slots__ = ("decision", "event", "request")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.event: trio.Event | None = None  # only a queued request waits
        self.decision: Admit | Shed | None = None

    def settle(self, decision: Admit | Shed) -> None:
        self.decision = decision
        if self.event is not None:
            self.event.set()


class Dispatcher:
    """Carries the core's decisions out to handlers, and time to the core."""

    def __init__(
        self,
        core: Scheduler,
        *,
        tick_s: Callable[[], float],
        pressure: Callable[[], tuple[float, float]],
        drained: Callable[[], bool] = lambda: False,
    ) -> None:
        self.core = core
        self._tick_s = tick_s
        self._pressure = pressure  # (pressure, when its scrape was taken)
        self._inflight_at: deque[tuple[float, int]] = deque()  # (time, in flight), for `unseen`
        self._drained = drained
        self._shutting_down = False
        self._wakeup = trio.Event()
        self._waiters: dict[int, Waiter] = {}
        self.on_tick: list[Callable[[float], None]] = []

    # -- the handlers' side: never blocks ---------------------------------------------------

    def submit(self, request: Request, *, bypass: bool = False) -> Waiter:
        """Decide on `request` now: admitted, shed, or queued (then `wait_decision`)."""
        waiter = Waiter(request)
        core = self.core
        now = trio.current_time()
        self._follow_drain()
        if bypass:
            waiter.settle(core.submit_bypass(request, now=now))
            return waiter
        decision = core.submit(request, now=now)
        if isinstance(decision, Queued):
            waiter.event = trio.Event()
            self._waiters[request.id] = waiter
            self._wakeup.set()  # its deadline may come before the timer's next wake-up
        else:
            waiter.settle(decision)
        return waiter

    def cancel(self, waiter: Waiter) -> None:
        """The handler gave up (client gone): leave the queue, or give the ticket back."""
        request_id = waiter.request.id
        if self.core.cancel(request_id):
            del self._waiters[request_id]
        elif isinstance(waiter.decision, Admit) and waiter.decision.ticket.outcome is None:
            self.core.ignore(waiter.decision.ticket)
            self._admit(trio.current_time())

    def finish(self, ticket: Ticket, sample: Sample | None) -> None:
        """End an admitted request (`sample` None: it says nothing about load); the room it
        frees goes to the queue's head at once."""
        if sample is None:
            self.core.ignore(ticket)
        else:
            self.core.finish(ticket, sample)
        self._admit(trio.current_time())

    def drain(self) -> None:
        """Refuse new arrivals from now on, for good (shutdown)."""
        self._shutting_down = True
        self._follow_drain()
        self._wakeup.set()

    @property
    def draining(self) -> bool:
        """Refusing new arrivals: shutting down, or drained by an operator (`drained()`, which
        every worker process reads from the same shared memory, so that all agree at once)."""
        return self._shutting_down or self._drained()

    def _follow_drain(self) -> None:
        if self.draining != self.core.draining:
            if self.draining:
                self.core.drain()
            else:
                self.core.undrain()

    async def wait_decision(self, waiter: Waiter) -> Admit | Shed:
        """The request's admission or shedding, waited for if it is queued; if cancelled
        meanwhile, the seat is handed back."""
        if waiter.event is not None and waiter.decision is None:
            try:
                await waiter.event.wait()
            except BaseException:
                self.cancel(waiter)
                raise
        assert waiter.decision is not None
        return waiter.decision

    # -- the timer ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        core = self.core
        next_tick_at = trio.current_time() + self._tick_s()
        self._inflight_at.append((trio.current_time(), core.gate.inflight))
        task_status.started()
        while True:
            wake_at = min(core.next_deadline(now=trio.current_time()), next_tick_at)
            with trio.move_on_at(wake_at):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            now = trio.current_time()
            self._inflight_at.append((now, core.gate.inflight))
            self._follow_drain()
            for shed in core.expire(now=now):
                self._waiters.pop(shed.request.id).settle(shed)
            self._admit(now)
            if now >= next_tick_at:
                pressure, scraped_at = self._pressure()
                core.tick(now=now, pressure=pressure, unseen=self._unseen(scraped_at))
                for hook in self.on_tick:
                    hook(now)
                next_tick_at = now + self._tick_s()
                self._admit(now)

    def _unseen(self, scraped_at: float) -> int:
        """How many more are in flight now than when the scrape was taken (as the simulator's
        `Replica.unseen`): in flight at the timer's last wake-up at or before the scrape."""
        log = self._inflight_at
        while len(log) > 1 and log[1][0] <= scraped_at:
            log.popleft()
        return max(0, self.core.gate.inflight - log[0][1]) if log else 0

    def _admit(self, now: float) -> None:
        for admit in self.core.poll(now=now):
            self._waiters.pop(admit.request.id).settle(admit)
