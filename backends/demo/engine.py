"""The demo server's engine: one trio task drives a `GpuModel` in real time.

Why one task: the model is a plain sans-IO object, so exactly one task (`DemoEngine.run`) calls
into it and no lock is needed. Request handlers only talk to it through tickets: `submit`,
`cancel` and `reconfigure` post a command (never blocking, so they work inside a cancelled
`finally`), and the handler then waits on its `Ticket` for admission, tokens or the end.

The owner sleeps until the earliest of: a command, the model's next event (a first token or an
end), or the next token due to a streaming request. Token times are kept as points on the
model's step counter, which does not move when the batch size changes (only the counter's speed
does), so one heap of "next token step" per streaming request stays valid across changes.
Non-streaming requests cost no wake-ups beyond their end.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import deque
from collections.abc import Callable

import trio

from scheduler.errors import SchedulerError
from scheduler.models.gpu import GpuConfig, GpuModel, GpuStats, Sequence


class TicketState(enum.Enum):
    PENDING = "pending"  # posted, not yet seen by the engine
    ADMITTED = "admitted"  # waiting or running in the model
    FINISHED = "finished"
    REFUSED = "refused"
    CANCELLED = "cancelled"


class Refusal(enum.Enum):
    WAITING_ROOM_FULL = "waiting_room_full"  # retry later: a 503
    TOO_LONG = "too_long"  # prompt plus output exceed the whole KV cache: a 400


class EngineStopped(SchedulerError):
    """The engine task is not running, so nothing would ever serve the request."""


class Ticket:
    """One request's handle on the engine. Only the engine task writes to it."""

    __slots__ = (
        "_changed",
        "id",
        "output_tokens",
        "prompt_tokens",
        "refusal",
        "retry_after_s",
        "seq",
        "state",
        "streaming",
        "tokens_ready",
    )

    def __init__(
        self, ticket_id: int, prompt_tokens: int, output_tokens: int, *, streaming: bool
    ) -> None:
        self.id = ticket_id
        self.prompt_tokens = max(0, prompt_tokens)
        self.output_tokens = max(1, output_tokens)
        self.streaming = streaming
        self.state = TicketState.PENDING
        self.seq: Sequence | None = None
        self.tokens_ready = 0  # output tokens produced so far (kept live for streams only)
        self.refusal: Refusal | None = None
        self.retry_after_s = 0.0
        self._changed: trio.Event | None = None

    @property
    def ended(self) -> bool:
        return self.state not in (TicketState.PENDING, TicketState.ADMITTED)

    async def wait_decided(self) -> None:
        """Until the engine has admitted or refused the request."""
        while self.state is TicketState.PENDING:
            await self._wait_changed()

    async def wait_tokens_beyond(self, count: int) -> None:
        """Until more than `count` output tokens are ready, or the request ended."""
        while self.tokens_ready <= count and not self.ended:
            await self._wait_changed()

    async def wait_ended(self) -> None:
        while not self.ended:
            await self._wait_changed()

    async def _wait_changed(self) -> None:
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


class _Cancel:
    __slots__ = ("ticket",)

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket


class _Reconfigure:
    __slots__ = ("applied", "config")

    def __init__(self, config: GpuConfig) -> None:
        self.config = config
        self.applied = trio.Event()


_Command = Ticket | _Cancel | _Reconfigure


class DemoEngine:
    """Serves tickets on a `GpuModel` in trio time. Start `run` in a nursery first."""

    def __init__(
        self, config: GpuConfig, *, on_ended: Callable[[Ticket], None] | None = None
    ) -> None:
        self._config = config
        self._on_ended = on_ended
        self._send, self._inbox = trio.open_memory_channel[_Command](math.inf)
        self._next_id = 0
        self._live = False
        self._tickets: dict[int, Ticket] = {}  # admitted, by sequence id
        self._unstarted: deque[Ticket] = deque()  # admitted streams not yet running, FIFO
        self._token_heap: list[tuple[float, int, Ticket]] = []  # (next token's step, id, ticket)
        self._stats = GpuModel(config).statistics()

    @property
    def live(self) -> bool:
        """Whether `run` is serving."""
        return self._live

    @property
    def config(self) -> GpuConfig:
        """The configuration in force once the commands posted so far are applied."""
        return self._config

    def statistics(self) -> GpuStats:
        """The model's state as of the engine's last wake-up."""
        return self._stats

    def submit(self, prompt_tokens: int, output_tokens: int, *, streaming: bool) -> Ticket:
        """Post a request; wait on the ticket for the decision. Streaming tickets get
        `tokens_ready` updated token by token, others only at the end."""
        if not self._live:
            raise EngineStopped("the demo engine is not running")
        self._next_id += 1
        ticket = Ticket(self._next_id, prompt_tokens, output_tokens, streaming=streaming)
        self._send.send_nowait(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: free its place in the model (a no-op once it ended)."""
        if self._live and not ticket.ended:
            self._send.send_nowait(_Cancel(ticket))

    async def reconfigure(self, config: GpuConfig) -> None:
        """Change the model's rules; returns once they are in force."""
        self._config = config
        if self._live:
            command = _Reconfigure(config)
            self._send.send_nowait(command)
            await command.applied.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the model until cancelled."""
        if self._live:
            raise RuntimeError("the demo engine is already running")
        model = GpuModel(self._config, now=trio.current_time())
        self._live = True
        task_status.started()
        wake_at = math.inf
        try:
            while True:
                commands = await self._receive_until(wake_at)
                now = trio.current_time()
                self._settle(model, now)
                for command in commands:
                    self._apply(model, command, now)
                    self._settle(model, now)
                wake_at = self._deliver_tokens(model, now)
                self._stats = model.statistics()
        finally:
            self._live = False

    async def _receive_until(self, deadline: float) -> list[_Command]:
        commands: list[_Command] = []
        with trio.move_on_at(deadline):
            commands.append(await self._inbox.receive())
        while True:
            try:
                commands.append(self._inbox.receive_nowait())
            except trio.WouldBlock:
                return commands

    def _apply(self, model: GpuModel, command: _Command, now: float) -> None:
        if isinstance(command, Ticket):
            self._admit(model, command, now)
        elif isinstance(command, _Cancel):
            self._cancel(model, command.ticket, now)
        else:
            model.reconfigure(command.config, now=now)
            command.applied.set()

    def _admit(self, model: GpuModel, ticket: Ticket, now: float) -> None:
        if ticket.prompt_tokens + ticket.output_tokens > model.config.kv_capacity_tokens:
            self._refuse(ticket, Refusal.TOO_LONG, 0.0)
            return
        seq = model.submit(ticket.id, ticket.prompt_tokens, ticket.output_tokens, now=now)
        if seq is None:
            self._refuse(ticket, Refusal.WAITING_ROOM_FULL, _drain_estimate_s(model, ticket))
            return
        ticket.seq = seq
        ticket.state = TicketState.ADMITTED
        self._tickets[seq.id] = ticket
        if ticket.streaming:
            self._unstarted.append(ticket)
        ticket._notify()

    def _refuse(self, ticket: Ticket, refusal: Refusal, retry_after_s: float) -> None:
        ticket.state = TicketState.REFUSED
        ticket.refusal = refusal
        ticket.retry_after_s = retry_after_s
        ticket._notify()

    def _cancel(self, model: GpuModel, ticket: Ticket, now: float) -> None:
        if ticket.ended or ticket.seq is None:
            return
        ticket.tokens_ready = _tokens_done(model, ticket.seq, now)
        model.cancel(ticket.seq, now=now)
        self._tickets.pop(ticket.id, None)
        self._end(ticket, TicketState.CANCELLED)

    def _settle(self, model: GpuModel, now: float) -> None:
        for seq in model.advance(now):
            ticket = self._tickets.pop(seq.id)
            ticket.tokens_ready = ticket.output_tokens
            self._end(ticket, TicketState.FINISHED)

    def _end(self, ticket: Ticket, state: TicketState) -> None:
        ticket.state = state
        ticket._notify()
        if self._on_ended is not None:
            self._on_ended(ticket)

    def _deliver_tokens(self, model: GpuModel, now: float) -> float:
        """Hand out the stream tokens due by `now`; returns when to wake up next."""
        while self._unstarted:
            ticket = self._unstarted[0]
            if not ticket.ended:
                assert ticket.seq is not None
                if math.isnan(ticket.seq.first_step):
                    break  # the model starts in FIFO order: the rest wait too
                heapq.heappush(self._token_heap, (ticket.seq.first_step, ticket.id, ticket))
            self._unstarted.popleft()
        heap = self._token_heap
        while heap:
            step, _, ticket = heap[0]
            if not ticket.ended and model.time_of_step(step) > now:
                break
            heapq.heappop(heap)
            if ticket.ended:
                continue
            assert ticket.seq is not None
            ticket.tokens_ready = max(ticket.tokens_ready + 1, _tokens_done(model, ticket.seq, now))
            ticket._notify()
            if ticket.tokens_ready < ticket.output_tokens:
                next_step = ticket.seq.first_step + ticket.tokens_ready
                heapq.heappush(heap, (next_step, ticket.id, ticket))
        wake_at = model.next_event_at()
        if heap:
            wake_at = min(wake_at, model.time_of_step(heap[0][0]))
        return wake_at


def _tokens_done(model: GpuModel, seq: Sequence, now: float) -> int:
    if math.isinf(model.step_at(now)):  # zero step time: everything is due at once
        return seq.output_tokens
    return model.tokens_done(seq, now=now)


def _drain_estimate_s(model: GpuModel, ticket: Ticket) -> float:
    """A Retry-After guess: the time a full batch needs to work through the waiting room."""
    config = model.config
    rounds = (model.waiting + 1) / config.max_batch
    return rounds * ticket.output_tokens * config.step_s(config.max_batch)
