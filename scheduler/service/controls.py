"""What a request may ask for itself, and how many requests a key may have open at once.

Per-request controls (README "Per-request controls"): a request may lower its own priority
(`x-scheduler-priority: <tier>`, queued as that lower tier) or its queue TTL
(`x-scheduler-max-wait-s: <seconds>`), never raise them past its key's tier. Why clamp rather
than refuse: nobody promotes themselves with a header (the tenant clamp), but a header set
once in a shared client's defaults must not turn into errors for the keys of other tiers, so
a value above the tier is the tier's. A malformed value is the caller's mistake, and a 400
that names the header: a typo never passes unseen.

"Lower" is by weight: a request may queue as a tier of smaller weight than its own (with
that tier's weight, depth and overload shedding), or as its own. A tier of equal weight is
not lower (it may wait longer, or not be shed on overload), so naming one is clamped to the
key's own tier. The key's quota and shed ladder stay its own tier's: only its place in the
queue changes.

Per-key concurrency (`max_concurrency`, a quota field): the key's requests open on this
replica, from the check before its quota until its answer ends (queued, at the backend,
streaming). Over the cap the request is refused with a 429, not queued: the cap is there for
a client that opens more parallel requests than it is meant to, and each queued one would
still hold a connection, a quota reservation and a queue seat; a 429 tells that client its
own parallelism is the cause (OpenAI's clients back off on it), while the fair queue already
keeps one key from crowding out its neighbours. It counts per replica (no Redis round trip
on the path, and no count left behind by a replica that dies): N replicas let a key have up
to N times its cap open in all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from scheduler.openai.errors import bad_request
from scheduler.service.config import TierSettings

PRIORITY_HEADER = "x-scheduler-priority"
MAX_WAIT_HEADER = "x-scheduler-max-wait-s"
_SECONDS = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


@dataclass(frozen=True, slots=True)
class RequestControls:
    """How one request queues: in `tier` (its key's own or a lower one), for at most
    `max_wait_s` (never more than that tier's `max_wait_s`)."""

    tier: TierSettings
    max_wait_s: float

    def deadline_at(self, arrival_at: float) -> float:
        """The request's own queue deadline (`math.inf`: the tier's maximum wait applies)."""
        if self.max_wait_s < self.tier.core.max_wait_s:
            return arrival_at + self.max_wait_s
        return math.inf


def request_controls(
    headers: Mapping[str, str], own: TierSettings, tiers: tuple[TierSettings, ...]
) -> RequestControls:
    """The controls `headers` ask for, clamped to the key's tier `own`; raises the 400 of a
    malformed header."""
    tier = own
    asked = headers.get(PRIORITY_HEADER)
    if asked is not None:
        named = next((t for t in tiers if t.core.name == asked.strip()), None)
        if named is None:
            names = ", ".join(t.core.name for t in tiers)
            raise bad_request(
                f"Header {PRIORITY_HEADER} must name a tier ({names}), got {asked!r:.60}.",
                param=PRIORITY_HEADER,
            )
        if named.core.weight < own.core.weight:
            tier = named
    max_wait_s = min(own.core.max_wait_s, tier.core.max_wait_s)
    wait = headers.get(MAX_WAIT_HEADER)
    if wait is not None:
        if not _SECONDS.fullmatch(wait.strip()) or float(wait) <= 0:
            raise bad_request(
                f"Header {MAX_WAIT_HEADER} must be a number of seconds > 0, got {wait!r:.60}.",
                param=MAX_WAIT_HEADER,
            )
        max_wait_s = min(max_wait_s, float(wait))
    return RequestControls(tier, max_wait_s)


class OpenRequests:
    """Each key's requests open on this replica (see the module docstring); one per replica."""

    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    def count(self, key_id: str) -> int:
        return self._open.get(key_id, 0)

    def enter_nowait(self, key_id: str, cap: int) -> Callable[[], None] | None:
        """Count one more open request of `key_id` and return what ends it (once); None,
        counting nothing, when the key already has `cap` open (`cap` 0: no cap)."""
        open_now = self._open.get(key_id, 0)
        if cap and open_now >= cap:
            return None
        self._open[key_id] = open_now + 1
        ended = False

        def leave() -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            left = self._open[key_id] - 1
            if left:
                self._open[key_id] = left
            else:
                del self._open[key_id]  # a key with nothing open takes no memory

        return leave
