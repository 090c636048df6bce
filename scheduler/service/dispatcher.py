"""The dispatcher: the one trio task that owns the scheduling core.

Why a task and a channel rather than handlers calling the core: the core is a plain object
with no locks, so exactly one task may touch it. Handlers post messages with `send_nowait`
(never blocking, never cancelled halfway) and wait on their own `Waiter`; the dispatcher
drains every message that is ready, then polls the core once, so a burst of arrivals costs
one admission pass. It sleeps until the next message or `next_deadline()`, whichever is
first, and ticks the controller every `tick_s`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import trio

from scheduler.core import (
    Admit,
    Decision,
    Queued,
    Request,
    Sample,
    Scheduler,
    Shed,
    Ticket,
)

_BATCH = 256  # messages handled before the core is polled again


class Waiter:
    """A handler's seat: set once with the request's `Admit` or `Shed`."""

    __slots__ = ("decision", "event", "request")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.event = trio.Event()
        self.decision: Admit | Shed | None = None

    def settle(self, decision: Admit | Shed) -> None:
        self.decision = decision
        self.event.set()


@dataclass(frozen=True, slots=True)
class _Submit:
    waiter: Waiter
    bypass: bool


@dataclass(frozen=True, slots=True)
class _Cancel:
    waiter: Waiter


@dataclass(frozen=True, slots=True)
class _Finish:
    ticket: Ticket
    sample: Sample | None  # None: ignore (says nothing about load)


@dataclass(frozen=True, slots=True)
class _Drain:
    pass


_Message = _Submit | _Cancel | _Finish | _Drain


class Dispatcher:
    """Carries the core's decisions out to waiting handlers."""

    def __init__(
        self,
        core: Scheduler,
        *,
        tick_s: Callable[[], float],
        pressure: Callable[[], float],
        drained: Callable[[], bool] = lambda: False,
    ) -> None:
        self.core = core
        self._tick_s = tick_s
        self._pressure = pressure
        self._drained = drained
        self._shutting_down = False
        self._send, self._receive = trio.open_memory_channel[_Message](math.inf)
        self._waiters: dict[int, Waiter] = {}
        self.on_tick: list[Callable[[float], None]] = []

    # -- the handlers' side: never blocks ---------------------------------------------------

    def submit(self, request: Request, *, bypass: bool = False) -> Waiter:
        waiter = Waiter(request)
        self._send.send_nowait(_Submit(waiter, bypass))
        return waiter

    def cancel(self, waiter: Waiter) -> None:
        """The handler gave up (client gone): leave the queue, or give the ticket back."""
        self._send.send_nowait(_Cancel(waiter))

    def finish(self, ticket: Ticket, sample: Sample | None) -> None:
        self._send.send_nowait(_Finish(ticket, sample))

    def drain(self) -> None:
        """Refuse new arrivals from now on, for good (shutdown)."""
        self._shutting_down = True
        self._send.send_nowait(_Drain())

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
        """Wait for admission or shedding; if cancelled meanwhile, hand the seat back."""
        try:
            await waiter.event.wait()
        except BaseException:
            self.cancel(waiter)
            raise
        assert waiter.decision is not None
        return waiter.decision

    # -- the owner's side ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        core = self.core
        next_tick_at = trio.current_time() + self._tick_s()
        task_status.started()
        while True:
            wake_at = min(core.next_deadline(now=trio.current_time()), next_tick_at)
            with trio.move_on_at(wake_at):
                message = await self._receive.receive()
                self._handle(message)
                for _ in range(_BATCH):
                    try:
                        self._handle(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
            now = trio.current_time()
            for shed in core.expire(now=now):
                self._waiters.pop(shed.request.id).settle(shed)
            self._admit(now)
            if now >= next_tick_at:
                self._follow_drain()
                core.tick(now=now, pressure=self._pressure())
                for hook in self.on_tick:
                    hook(now)
                next_tick_at = now + self._tick_s()
                self._admit(now)

    def _admit(self, now: float) -> None:
        for admit in self.core.poll(now=now):
            self._waiters.pop(admit.request.id).settle(admit)

    def _handle(self, message: _Message) -> None:
        now = trio.current_time()
        core = self.core
        self._follow_drain()
        if isinstance(message, _Submit):
            waiter = message.waiter
            decision: Decision
            if message.bypass:
                decision = core.submit_bypass(waiter.request, now=now)
            else:
                decision = core.submit(waiter.request, now=now)
            if isinstance(decision, Queued):
                self._waiters[waiter.request.id] = waiter
            else:
                waiter.settle(decision)
        elif isinstance(message, _Drain):
            pass  # a wake-up: `_follow_drain` above did it
        elif isinstance(message, _Finish):
            if message.sample is None:
                core.ignore(message.ticket)
            else:
                core.finish(message.ticket, message.sample)
        else:
            waiter = message.waiter
            if core.cancel(waiter.request.id):
                del self._waiters[waiter.request.id]
            elif isinstance(waiter.decision, Admit) and waiter.decision.ticket.outcome is None:
                core.ignore(waiter.decision.ticket)
