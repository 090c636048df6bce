"""The request model and the decisions the core hands back.

Decisions are plain values: the core never raises to say "no". The hot values (requests,
decisions) are named tuples: immutable like frozen dataclasses, at a fifth of the cost to
make, which the simulator's millions of requests notice; the hottest paths (the core's
`Admit` and `Queued`, the simulator's `Request` and `Sample`) call `tuple.__new__` with every
field, half the cost again of calling the class. A shed or a refusal is an
ordinary outcome that the service turns into a response (the tier's shed ladder, a 429 or a
503); exceptions are kept for programming errors such as ending a ticket twice.
"""

from __future__ import annotations

import enum
import math
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from scheduler.core.gate import Ticket


class Request(NamedTuple):
    """One inference request as the scheduler sees it.

    `cost` is the estimated tokens (prompt plus `max_tokens`), or 1 when unknown, and must be
    > 0 (the queue checks); `deadline_at` is the caller's own deadline (`math.inf` when it
    has none). The queue applies the tier's maximum wait on top of it.
    """

    id: int
    tenant: str
    tier: str
    key_id: str
    model: str
    cost: float
    arrival_at: float
    deadline_at: float = math.inf


def request_cost(prompt_tokens: int, output_tokens: int) -> float:
    """A request's cost in the fair queue and its token reservation: the prompt plus the
    output it may produce (the service's `max_tokens`, the simulator's drawn size), at least 1."""
    tokens = prompt_tokens + output_tokens
    return float(tokens) if tokens > 1 else 1.0


class ShedReason(enum.Enum):
    """Why a request left the queue without being admitted."""

    DEADLINE = "deadline"
    QUEUE_FULL = "queue_full"
    OVERLOAD = "overload"
    DRAINING = "draining"
    PREDICTED_WAIT = "predicted_wait"  # would wait past its deadline: shed on arrival


class Outcome(enum.Enum):
    """How an admitted request ended, as the gate and controller count it."""

    COMPLETED = "completed"
    DROPPED = "dropped"  # backend 429/503/timeout: a congestion signal
    IGNORED = "ignored"  # client went away, or an error that says nothing about load


class Admit(NamedTuple):
    """Send the request to a backend now; end `ticket` when the call ends."""

    request: Request
    ticket: Ticket
    queued_s: float


class Queued(NamedTuple):
    """The request waits in its tier's queue; a later `Admit` or `Shed` will follow."""

    request: Request


class Shed(NamedTuple):
    """The request could not be admitted; the service walks the tier's shed ladder.
    `predicted_wait_s`: for `PREDICTED_WAIT`, the wait that was predicted."""

    request: Request
    reason: ShedReason
    queued_s: float = 0.0
    predicted_wait_s: float = 0.0


Decision = Admit | Queued | Shed
