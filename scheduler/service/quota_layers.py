"""The quotas a key shares with others: its tenant's (all the tenant's keys together) and its
model's (every key's requests to it: a global contract, e.g. a backend's tokens per minute).

Why here, apart from the key's own: a key's quotas come from its tier and its overrides, one
per key; these come from the `[tenants.T.quota]` and `[models.M.quota]` tables, one per tenant
or model, and the store checks and takes them with the key's own in one call
(`scheduler.core.quota_store`, one Lua script in Redis), all or none.

Where they live in Redis (`tag`): a script may touch the keys of one Redis Cluster slot only,
so every state one request touches shares one hash tag. With tenant layers only, a key's states
and its tenant's are tagged by the tenant (a key has one tenant). With a model layer, a key's
states would have to sit in the slot of every model it calls, which no layout gives but one:
every quota state of the deployment under one tag (tagging by model instead would split a key's
counters by model, and a key calling two models would get its quota twice). On one server or
Sentinel the tag changes nothing; on a Cluster it puts the quota traffic on one shard. Adding
the first tenant or model layer moves the counters (they start again from zero, as after
their window), and so does moving a key to another tenant under a tenant layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

from scheduler.core.quota_store import LayerName, QuotaLayer
from scheduler.service.quota import QuotaSettings

EVERY_TENANT = "*"  # `[tenants."*".quota]`: each tenant without a table of its own
DEPLOYMENT_TAG = "quota"  # the one hash tag of every quota state, with a model layer


@dataclass(frozen=True, slots=True)
class SharedQuotas:
    """The tenant and model layers of a deployment, by name (`EVERY_TENANT` for the rest)."""

    tenants: tuple[tuple[str, QuotaSettings], ...] = ()
    models: tuple[tuple[str, QuotaSettings], ...] = ()

    _by_tenant: dict[str, QuotaLayer] = field(init=False, repr=False, compare=False)
    _by_model: dict[str, QuotaLayer] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:  # worked out once, not per request
        by_tenant = {name: _layer("tenant", name, quotas) for name, quotas in self.tenants}
        object.__setattr__(self, "_by_tenant", by_tenant)
        by_model = {name: _layer("model", name, quotas) for name, quotas in self.models}
        object.__setattr__(self, "_by_model", by_model)

    def layers(self, tenant: str, model: str) -> tuple[QuotaLayer, ...]:
        """The layers a request of `tenant`'s key to `model` is counted on, tenant first."""
        if not self.tenants and not self.models:
            return ()
        found = []
        layer = self._by_tenant.get(tenant)
        if layer is None and (every := self._by_tenant.get(EVERY_TENANT)) is not None:
            layer = dataclasses.replace(every, scope=tenant)  # counted under its own name
        if layer is not None:
            found.append(layer)
        layer = self._by_model.get(model)
        if layer is not None:
            found.append(layer)
        return tuple(found)

    def tag(self, tenant: str) -> str | None:
        """The hash tag of every quota state of `tenant`'s keys (None: each key's own)."""
        if self.models:
            return DEPLOYMENT_TAG
        if self.tenants:
            return "t:" + hashlib.sha256(tenant.encode()).hexdigest()[:16]
        return None

    def knob(self, layer: QuotaLayer) -> str:
        """The config table that set `layer`: `tenants.acme.quota`, `models.m.quota`."""
        if layer.name == "model":
            return f"models.{layer.scope}.quota"
        named = layer.scope in self._by_tenant
        return f"tenants.{layer.scope if named else EVERY_TENANT}.quota"


def _layer(name: LayerName, scope: str, quotas: QuotaSettings) -> QuotaLayer:
    requests, tokens = quotas.specs()
    return QuotaLayer(name, scope, requests, tokens, quotas.enforce)
