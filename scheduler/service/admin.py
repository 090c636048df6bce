"""The admin API under /admin/v1/, for SREs: keys, quotas, credits, controller gains, the
emergency levers (a lower backend timeout, keys and tenants in bypass), drain.

Authenticated by its own token (`SCHEDULER_ADMIN_TOKEN`); without one the whole API is off
(404). Changes live in Redis, so every replica sees them: key records within the registry's
cache time (0.5 s), controller gains and levers at their next poll (0.5 s), this replica at
once.
Bodies are validated like the config file: a bad field, or one no route knows, is refused
with a 400 that names it.

Every route that needs Redis does its Redis work within the Redis timeout (the adaptive one,
at least `redis.timeout_s`); a Redis that is down, paused or refusing is a 503 with
`Retry-After`, translated in one place (`_redis_bound`). A gains or levers change is
published to Redis first and applied here only once Redis took it: everywhere or nowhere.
Routes that need no Redis (reading the controller or the levers, drain) keep working during
an outage.
"""

from __future__ import annotations

import dataclasses
import difflib
import hmac
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, ParamSpec

import trio
from quart import Blueprint, Response, request

from backends.redis.errors import RedisUnavailable
from backends.redis.quota import QuotaStoreError
from scheduler.core import AIMDConfig, LatencySignal
from scheduler.openai.body import parse_body
from scheduler.openai.errors import ApiError, Refusal, bad_request, refused
from scheduler.service.config import (
    MAX_COUNT,
    MAX_TTL_S,
    ConfigError,
    Table,
    gains_to_dict,
    quota_settings,
)
from scheduler.service.levers import Levers
from scheduler.service.quota import QuotaSettings
from scheduler.service.replica import Replica
from scheduler.service.tenancy import QUOTA_FIELDS, KeysUnavailable

GAIN_FIELDS = {f.name: f for f in dataclasses.fields(AIMDConfig)}
MAX_NUMBER = 1e9  # no gain needs more
KEY_FIELDS = ("tenant", "tier", "bypass")
# Redis's failures, and our own deadline (`_redis_bound`) for the Redis work of a route
REDIS_FAILURES = (RedisUnavailable, trio.TooSlowError, KeysUnavailable, QuotaStoreError)
P = ParamSpec("P")


def redis_unavailable() -> ApiError:
    message = "Redis is unavailable: the admin API cannot read or change shared state now."
    refusal = Refusal("redis_unavailable", "redis.timeout_s")
    return refused(503, message, refusal, retry_after_s=1.0, code="redis_unavailable")


@contextmanager
def _redis_bound(deadline_at: float) -> Iterator[None]:
    """Redis work by `deadline_at`; a Redis that is late, gone or refusing becomes a 503."""
    try:
        with trio.fail_at(deadline_at):
            yield
    except REDIS_FAILURES as exc:
        raise redis_unavailable() from exc


def _refuse_unknown(body: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    """A field the route does not know is a 400 naming it (a typo must not pass unseen)."""
    unknown = sorted(set(body) - set(known))
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise bad_request(f"{where}.{name}: unknown field{hint}", param=name)


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _json(data: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(data, allow_nan=False), status=status, content_type="application/json"
    )


async def _body() -> dict[str, Any]:
    raw = await request.get_data(as_text=False)
    assert isinstance(raw, bytes)
    return parse_body(raw or b"{}")


def _number(value: Any, where: str, *, low: float, high: float) -> float:
    """A finite number in [low, high]; a bool, NaN, Infinity or a huge int is a 400."""
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    try:
        number = float(value) if ok else math.nan
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and low <= number <= high):
        raise bad_request(f"{where}: expected a number in [{low:g}, {high:g}], got {value!r:.40}")
    return number


def _validated(make: Any, *args: Any) -> Any:
    try:
        return make(*args)
    except (ConfigError, ValueError) as exc:
        raise bad_request(str(exc)) from exc


def quota_fields(body: dict[str, Any], where: str) -> dict[str, Any]:
    """Validated quota fields of a body, only those given (for overrides and upgrades)."""
    _refuse_unknown(body, QUOTA_FIELDS, where)
    given = dict(body)
    settings = _validated(quota_settings, Table(given, where), QuotaSettings())
    return {k: getattr(settings, k) for k in given}


def gain_changes(body: dict[str, Any]) -> dict[str, Any]:
    """Validated AIMD gain changes: known fields, right types (the config checks the rest)."""
    changes: dict[str, Any] = {}
    signals = {s.value for s in LatencySignal}
    for name, value in body.items():
        where = f"controller.{name}"
        if name not in GAIN_FIELDS:
            raise bad_request(f"{where}: unknown gain", param=name)
        if name == "latency_signal":
            if not isinstance(value, str) or value not in signals:
                raise bad_request(f"{where}: expected 'latency', 'ttft' or 'tpot'", param=name)
            changes[name] = LatencySignal(value)
        else:
            changes[name] = _number(value, where, low=-MAX_NUMBER, high=MAX_NUMBER)
    return changes


Route = Callable[..., Awaitable[Response]]


def create_admin(replica: Replica) -> Blueprint:
    admin = Blueprint("admin", __name__, url_prefix="/admin/v1")
    _add_authentication(admin, replica)
    uses_redis = _redis_bounded(replica)
    _add_key_routes(admin, replica, uses_redis)
    _add_quota_routes(admin, replica, uses_redis)
    _add_controller_routes(admin, replica, uses_redis)
    _add_lever_routes(admin, replica, uses_redis)
    _add_drain_routes(admin, replica)
    return admin


def _add_authentication(admin: Blueprint, replica: Replica) -> None:
    token = replica.settings.admin_token

    @admin.before_request
    async def authenticate() -> None:
        if not token:
            raise ApiError(404, "The admin API is off: set SCHEDULER_ADMIN_TOKEN to enable it.")
        given = request.headers.get("authorization", "")
        if not given.lower().startswith("bearer ") or not hmac.compare_digest(
            given[7:].strip().encode(), token.encode()
        ):
            raise ApiError(401, "A valid admin token is required.", code="invalid_admin_token")
        if replica.registry.store is None and request.path.startswith("/admin/v1/keys"):
            raise redis_unavailable()


def _redis_bounded(replica: Replica) -> Callable[[Route], Route]:
    def uses_redis(route: Callable[P, Awaitable[Response]]) -> Callable[P, Awaitable[Response]]:
        """The route's work within the Redis timeout (its body read first, outside it: a slow
        client is not a slow Redis)."""

        @wraps(route)
        async def bounded(*args: P.args, **kwargs: P.kwargs) -> Response:
            await request.get_data()  # cached: `_body()` reads it again
            with _redis_bound(trio.current_time() + replica.redis_timeout.current()):
                return await route(*args, **kwargs)

        return bounded

    return uses_redis


async def _known(replica: Replica, key_id: str) -> None:
    if not await replica.registry.exists(key_id):
        raise ApiError(404, f"No key with id {key_id!r}.", code="key_not_found")


def _new_key(body: dict[str, Any], tiers: tuple[str, ...]) -> tuple[str, str, bool]:
    """A new key's tenant, tier and bypass flag, validated."""
    _refuse_unknown(body, KEY_FIELDS, "key")
    tenant, tier = body.get("tenant"), body.get("tier")
    if not isinstance(tenant, str) or not 0 < len(tenant) <= 256 or not _utf8(tenant):
        raise bad_request("'tenant' must be a string of 1 to 256 characters.", param="tenant")
    if tier not in tiers:  # a tuple, not a set: a tier sent as a list is refused, not a 500
        raise bad_request(
            f"'tier' must be one of the configured tiers, got {tier!r}.", param="tier"
        )
    bypass = body.get("bypass", False)
    if not isinstance(bypass, bool):
        raise bad_request("'bypass' must be a boolean.", param="bypass")
    assert isinstance(tier, str)
    return tenant, tier, bypass


def _add_key_routes(
    admin: Blueprint, replica: Replica, uses_redis: Callable[[Route], Route]
) -> None:
    registry = replica.registry

    @admin.get("/keys")
    @uses_redis
    async def list_keys() -> Response:
        return _json({"data": [r.public() for r in await registry.list()]})

    @admin.post("/keys")
    @uses_redis
    async def create_key() -> Response:
        tiers = tuple(t.core.name for t in replica.settings.tiers)
        tenant, tier, bypass = _new_key(await _body(), tiers)
        clear, record = await registry.create(tenant, tier, bypass=bypass, created_unix=time.time())
        return _json({"key": clear, **record.public()}, 201)

    @admin.get("/keys/<key_id>")
    @uses_redis
    async def get_key(key_id: str) -> Response:
        await _known(replica, key_id)
        record = await registry.refresh(key_id, now=trio.current_time())
        assert record is not None
        return _json(record.public())

    @admin.delete("/keys/<key_id>")
    @uses_redis
    async def revoke_key(key_id: str) -> Response:
        await _known(replica, key_id)
        await registry.revoke(key_id)
        return _json({"key_id": key_id, "revoked": True})


def _expires_in_s(body: dict[str, Any]) -> float:
    """An upgrade's `expires_in_s`, taken out of its body."""
    expires_in_s = body.pop("expires_in_s", None)
    if (
        isinstance(expires_in_s, bool)
        or not isinstance(expires_in_s, int | float)
        or not (0 < expires_in_s <= MAX_TTL_S)
    ):
        raise bad_request(
            "'expires_in_s' must be a number of seconds in (0, 90 days].", param="expires_in_s"
        )
    return expires_in_s


def _credit_grant(body: dict[str, Any]) -> tuple[float, float]:
    """A credits body's amount (a whole number of tokens) and ttl_s."""
    _refuse_unknown(body, ("amount", "ttl_s"), "credits")
    amount = _number(body.get("amount"), "credits.amount", low=1, high=MAX_COUNT)
    if not amount.is_integer():
        raise bad_request("credits.amount: expected a whole number of tokens", param="amount")
    ttl_s = _number(body.get("ttl_s", 86_400), "credits.ttl_s", low=0.001, high=MAX_TTL_S)
    return amount, ttl_s


def _add_quota_routes(
    admin: Blueprint, replica: Replica, uses_redis: Callable[[Route], Route]
) -> None:
    @admin.put("/keys/<key_id>/quota")
    @uses_redis
    async def set_quota(key_id: str) -> Response:
        await _known(replica, key_id)
        fields = quota_fields(await _body(), "quota")
        await replica.registry.set_override(key_id, fields)
        return _json({"key_id": key_id, "quota_override": fields})

    @admin.post("/keys/<key_id>/upgrades")
    @uses_redis
    async def upgrade(key_id: str) -> Response:
        await _known(replica, key_id)
        body = await _body()
        expires_in_s = _expires_in_s(body)
        fields = quota_fields(body, "upgrade")
        if not fields:
            raise bad_request("An upgrade needs at least one quota field.")
        await replica.registry.set_upgrade(key_id, fields, expires_in_s=expires_in_s)
        return _json({"key_id": key_id, "upgrade": fields, "expires_in_s": expires_in_s}, 201)

    @admin.post("/keys/<key_id>/credits")
    @uses_redis
    async def credits(key_id: str) -> Response:
        await _known(replica, key_id)
        amount, ttl_s = _credit_grant(await _body())
        store = replica.quota.store
        if store is None:
            raise redis_unavailable()
        record = await replica.registry.refresh(key_id, now=trio.current_time())
        assert record is not None
        tag = replica.settings.shared_quotas.tag(record.tenant)  # where its quotas are kept
        if await store.credits(key_id, tag=tag) + amount > MAX_COUNT:
            raise bad_request(f"credits.amount: the balance would pass {MAX_COUNT}")
        balance = await store.add_credits(key_id, int(amount), ttl_s=ttl_s, tag=tag)
        return _json({"key_id": key_id, "credits": balance})


def _add_controller_routes(
    admin: Blueprint, replica: Replica, uses_redis: Callable[[Route], Route]
) -> None:
    @admin.get("/controller")
    async def get_controller() -> Response:
        stats = replica.controller.statistics()
        return _json(
            {
                "gains": gains_to_dict(replica.gains.config),
                "limit": stats.limit,
                "inflight": replica.gateway.dispatcher.core.gate.inflight,
                "congested": stats.congested,
                "pressure": stats.pressure,
            }
        )

    @admin.put("/controller")
    @uses_redis
    async def set_controller() -> Response:
        changes = gain_changes(await _body())
        try:
            # the route's own deadline: Redis refuses the write past it (scheduler.service.gains)
            deadline_at = trio.current_effective_deadline()
            config = await replica.gains.change(changes, deadline_at=deadline_at)
        except ValueError as exc:
            raise bad_request(str(exc)) from exc
        return _json({"gains": gains_to_dict(config)})


def _bypass(body: dict[str, Any], where: str) -> bool:
    _refuse_unknown(body, ("bypass",), where)
    bypass = body.get("bypass")
    if not isinstance(bypass, bool):
        raise bad_request(f"{where}.bypass: expected a boolean", param="bypass")
    return bypass


def _timeout_lever(body: dict[str, Any], configured_s: float) -> float | None:
    """A levers body's `request_timeout_s`: a number in (0, the config's], or null (back)."""
    _refuse_unknown(body, ("request_timeout_s",), "levers")
    if "request_timeout_s" not in body:
        raise bad_request("levers: give request_timeout_s (null: back to the config's)")
    value = body["request_timeout_s"]
    if value is None:
        return None
    where = "levers.request_timeout_s"
    timeout_s = _number(value, where, low=0, high=configured_s)
    if timeout_s <= 0:
        raise bad_request(f"{where}: must be > 0", param="request_timeout_s")
    return timeout_s


def _add_lever_routes(
    admin: Blueprint, replica: Replica, uses_redis: Callable[[Route], Route]
) -> None:
    levers = replica.levers
    configured_s = replica.settings.server.request_timeout_s

    def shown(value: Levers) -> dict[str, Any]:
        return {**value.public(), "effective_request_timeout_s": value.timeout_s(configured_s)}

    async def change(make: Callable[[Levers], Levers]) -> Response:
        # the route's own deadline: Redis refuses the write past it (scheduler.service.shared)
        value = await levers.change(make, deadline_at=trio.current_effective_deadline())
        return _json(shown(value))

    @admin.get("/levers")
    async def get_levers() -> Response:
        return _json(shown(levers.value))

    @admin.put("/levers")
    @uses_redis
    async def set_levers() -> Response:
        """The backend request timeout, lowered live on every replica, or back (null)."""
        timeout_s = _timeout_lever(await _body(), configured_s)
        return await change(lambda v: dataclasses.replace(v, request_timeout_s=timeout_s))

    @admin.patch("/tenants/<tenant>")
    @uses_redis
    async def set_tenant(tenant: str) -> Response:
        """Every key of `tenant` a bypass key, on every replica, or back."""
        bypass = _bypass(await _body(), "tenant")
        if bypass:
            return await change(
                lambda v: dataclasses.replace(v, bypass_tenants=v.bypass_tenants | {tenant})
            )
        return await change(
            lambda v: dataclasses.replace(v, bypass_tenants=v.bypass_tenants - {tenant})
        )

    @admin.patch("/keys/<key_id>")
    @uses_redis
    async def set_key(key_id: str) -> Response:
        """The key a bypass key, or back (every replica within the registry's cache time)."""
        await _known(replica, key_id)
        bypass = _bypass(await _body(), "key")
        await replica.registry.set_bypass(key_id, bypass)
        record = await replica.registry.refresh(key_id, now=trio.current_time())
        assert record is not None
        return _json(record.public())


def _add_drain_routes(admin: Blueprint, replica: Replica) -> None:
    @admin.post("/drain")
    async def drain() -> Response:
        """Every worker of this process refuses new requests (503) until undrained."""
        replica.drain_flag.set()
        return _json({"draining": True})

    @admin.post("/undrain")
    async def undrain() -> Response:
        """Take new requests again (not once shutting down: that drain is for good)."""
        replica.drain_flag.clear()
        return _json({"draining": replica.gateway.dispatcher.draining})
