"""The SRE's emergency levers, live on every replica (README "Admin API").

Two levers, both undone by setting them back: a lower backend request timeout (the
backends are hanging: fail fast, answer 504 and free the slots, rather than hold every
request for `server.request_timeout_s`), and whole tenants turned into bypass (an important
tenant shed or over quota in an incident: its keys skip the quota and the queue). Turning one
key into bypass is the key's own record (`bypass`, through `PATCH /admin/v1/keys/{id}`).

The levers are one shared value (`scheduler.service.shared`): changed through the admin API
on any replica, published to Redis first, and taken up by every other replica at its next
poll (0.5 s).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from scheduler.service.shared import Codec, SharedValue
from scheduler.service.tenancy import KeyRecord

LEVERS_KEY = "control:levers"  # {"version": n, "levers": {...}}, written by the admin API


@dataclass(frozen=True, slots=True)
class Levers:
    """`request_timeout_s`: the backend request timeout while lowered (None: the config's);
    `bypass_tenants`: tenants whose every key is a bypass key."""

    request_timeout_s: float | None = None
    bypass_tenants: frozenset[str] = field(default_factory=frozenset)

    def timeout_s(self, configured_s: float) -> float:
        """The backend request timeout now: the lowered one, never above the config's."""
        if self.request_timeout_s is None:
            return configured_s
        return min(configured_s, self.request_timeout_s)

    def applied_to(self, record: KeyRecord) -> KeyRecord:
        """`record`, a bypass key if its tenant is turned into bypass."""
        if record.bypass or record.tenant not in self.bypass_tenants:
            return record
        return dataclasses.replace(record, bypass=True)

    def public(self) -> dict[str, Any]:
        return {
            "request_timeout_s": self.request_timeout_s,
            "bypass_tenants": sorted(self.bypass_tenants),
        }


def levers_from_dict(data: Mapping[str, Any]) -> Levers:
    """The inverse of `Levers.public`; raises ValueError or TypeError on a malformed one."""
    timeout_s = data["request_timeout_s"]
    if timeout_s is not None and not (
        isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0
    ):
        raise ValueError(f"levers.request_timeout_s: expected a number > 0, got {timeout_s!r}")
    tenants = data["bypass_tenants"]
    if not isinstance(tenants, list) or not all(isinstance(t, str) for t in tenants):
        raise TypeError("levers.bypass_tenants: expected a list of tenant names")
    return Levers(None if timeout_s is None else float(timeout_s), frozenset(tenants))


LEVERS: Codec[Levers] = Codec("levers", Levers.public, levers_from_dict)
LeversOwner = SharedValue[Levers]
