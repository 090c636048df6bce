"""Priority bands: a higher band is admitted first, and the lower bands are held back while a
protected tier above them is slower than its `protect_latency_s`, down to their floor.

Why this design: strict order in the queue alone does not protect the top band on an LLM
backend. Every sequence in a batch slows the others, so Pro and Free calls let into slots
that Enterprise leaves free make Enterprise's own calls slower, with no queue in sight. So
each band below the top has a ceiling on the slots it and the bands below it may hold: an
AIMD of its own, driven by the latency the protected tiers above it get (arrival to answer).

- Cut: a protected call later than its target (seen at the first tick after it passes it,
  while still in flight: its end would come a whole call later) cuts the ceiling by
  `_DECREASE`, once per that target's length (the calls admitted under the old ceiling take
  about that long to end).
- Growth: a tick without a late call grows it by a slot per two lengths of that target
  (TCP's one segment per round trip, slower: a slot's effect on the protected calls shows
  only a call later), up to the gate's window.
- Opening: once the bands above had nothing queued or in flight for a target's length, the
  ceiling stops applying (the lower bands may fill the window), and applies again, as it was,
  the moment a call of a band above is admitted. Resetting it to the window instead let a
  flood in that took eight cuts (eight targets) to bring back down, every time the protected
  tier paused.

With spare capacity the protected tiers meet their target, the ceiling stays at the window
and only the queue order is left (weights decide inside a band); a tier without
`protect_latency_s` holds nobody back. The protected tier's p95 lands above the target
(calls already running are not preempted; the lower bands' slots are few, so each matters):
set the target below the p95 wanted. The gains are not where that is won: other gains, or
cutting on the share of late calls rather than on each one, move the p95 and the lower
bands' goodput along the same curve as the target does (README, "Priority bands").

Floors: a band keeps `floor` of the window for itself (its tiers' floors summed): while it
holds fewer slots than that, its queued requests go first, whatever the ceilings and the
higher bands, so a lower band is never starved by a higher one's flood.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scheduler.core.gate import Ticket
from scheduler.core.wfq import TierConfig

_DECREASE = 0.7  # the ceiling's cut, as the limit's default `decrease_factor`
_GROWTH_TARGETS = 2.0  # a ceiling grows by a slot per this many lengths of its target


class Bands:
    """In-flight per band, and the ceilings and floors that decide which band is next.
    Band 0 is the highest; `band_of` maps a tier to its band."""

    __slots__ = (
        "_band_of",
        "_busy_at",
        "_ceilings",
        "_cooldown_s",
        "_cut_at",
        "_floors",
        "_inflight",
        "_late",
        "_lifted",
        "_open",
        "_targets",
        "_ticked_at",
    )

    def __init__(
        self, tiers: Sequence[TierConfig], band_of: dict[str, int], *, window: int, now: float
    ) -> None:
        self._ticked_at = now
        count = max(band_of.values()) + 1
        self._band_of = band_of
        self._inflight = [0] * count
        self._floors = [0.0] * count
        for tier in tiers:
            self._floors[band_of[tier.name]] += tier.floor
        self._targets = {t.name: t.protect_latency_s for t in tiers if t.protect_latency_s}
        self._ceilings = [float(window)] * count  # [0] unused: the top band has none
        self._open: dict[int, tuple[float, int]] = {}  # protected calls: (late at, band)
        self._late = [False] * count  # a protected call above ended late since the last tick
        self._cut_at = [-math.inf] * count
        self._lifted = [False] * count  # the bands above idle: the ceiling does not apply
        self._busy_at = [now] * count  # when the bands above last had something
        self._cooldown_s = [  # the longest target above each band
            max((self._targets.get(t.name, 0.0) for t in tiers if band_of[t.name] < b), default=0)
            for b in range(count)
        ]

    def band(self, tier: str) -> int:
        return self._band_of[tier]

    def admitted(self, ticket: Ticket) -> None:
        request = ticket.request
        band = self._band_of[request.tier]
        self._inflight[band] += 1
        for below in range(band + 1, len(self._lifted)):  # the bands above are back
            self._lifted[below] = False
        target = self._targets.get(request.tier)
        if target is not None:
            self._open[ticket.id] = (request.arrival_at + target, band)

    def ended(self, ticket: Ticket, latency_s: float | None) -> None:
        """`ticket`'s call ended; `latency_s` from its arrival (None: it says nothing)."""
        tier = ticket.request.tier
        band = self._band_of[tier]
        self._inflight[band] -= 1
        protected = self._open.pop(ticket.id, None) is not None
        if protected and latency_s is not None and latency_s > self._targets[tier]:
            self._hold_below(band)

    def _hold_below(self, band: int) -> None:
        for below in range(band + 1, len(self._late)):
            self._late[below] = True

    def next_band(self, depths: Sequence[int], window: int) -> int | None:
        """The band to admit from next, given each band's queue depth (None: none may go).
        A band under its floor goes first; otherwise the highest queued band, if its
        ceilings allow."""
        inflight, floors = self._inflight, self._floors
        for band, depth in enumerate(depths):
            if depth and inflight[band] < floors[band] * window:
                return band
        for band, depth in enumerate(depths):
            if depth:
                return band if self._under_ceilings(band) else None
        return None

    def allows(self, tier: str, window: int) -> bool:
        """Whether a request of `tier` may be admitted with nothing queued."""
        band = self._band_of[tier]
        return self._inflight[band] < self._floors[band] * window or self._under_ceilings(band)

    def _under_ceilings(self, band: int) -> bool:
        inflight, ceilings, lifted = self._inflight, self._ceilings, self._lifted
        held = sum(inflight[band:])
        for above in range(band, 0, -1):  # each ceiling caps its band and those below
            if held >= ceilings[above] and not lifted[above]:
                return False
            held += inflight[above - 1]
        return True

    def slots(self, tier: str, window: int, *, queued_above: bool) -> float:
        """How many of the window's slots `tier`'s band can count on now: its floor, or what
        the ceilings and the higher bands' in-flight leave it (its floor alone while a higher
        band has requests queued: those go first)."""
        band = self._band_of[tier]
        floor = self._floors[band] * window
        if queued_above:
            return floor
        inflight, ceilings = self._inflight, self._ceilings
        free = float(window - sum(inflight[:band]))
        between = 0
        for above in range(band, 0, -1):
            if not self._lifted[above]:
                free = min(free, ceilings[above] - between)
            between += inflight[above - 1]
        return max(floor, free, 0.0)

    def tick(self, *, now: float, window: int, depths: Sequence[int]) -> None:
        """Cut the ceilings of the bands below a late protected call; grow the others by a
        slot per two lengths of their target (a slot's effect shows a call later); lift them
        while the bands above had nothing queued or in flight that long."""
        for late_at, band in self._open.values():  # late already, before their end
            if late_at < now:
                self._hold_below(band)
        ceilings, late, cut_at, busy_at = self._ceilings, self._late, self._cut_at, self._busy_at
        inflight = self._inflight
        elapsed = now - self._ticked_at
        self._ticked_at = now
        for band in range(1, len(ceilings)):
            cooldown_s = self._cooldown_s[band]
            if late[band] or any(inflight[:band]) or any(depths[:band]):
                busy_at[band] = now
            self._lifted[band] = now - busy_at[band] >= cooldown_s
            if late[band]:
                if now - cut_at[band] >= cooldown_s:
                    ceilings[band] *= _DECREASE
                    cut_at[band] = now
                late[band] = False
            elif cooldown_s and not self._lifted[band]:
                ceilings[band] += elapsed / (_GROWTH_TARGETS * cooldown_s)
            ceilings[band] = min(ceilings[band], float(window))

    def ceilings(self) -> tuple[float, ...]:
        """Each band's ceiling (the top band's: the window), kept while it is lifted."""
        return tuple(self._ceilings)
