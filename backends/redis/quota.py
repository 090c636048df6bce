"""The Redis quota store: one atomic script per request over a key's request and token quotas.

Why this design: quotas must hold exactly across replicas, so the check and the take happen in
one Lua script (`backends.redis.lua`, the twins of `policies`' algorithms) that sees every
quota of the key at once: it decides on the request quota (cost 1) and the token quota (cost =
the estimated tokens) and takes both or neither. Time is Redis `TIME` (one clock for every
replica) unless an explicit `now` is given (the simulator and the tests); never mix the two on
one key, their clocks differ.

Key layout, with one hash tag per call so one request touches one Redis Cluster slot. Without
a `tag` (no shared layer configured) the key id is the tag:

    <prefix>:{<key_id>}:requests:<algorithm>   request quota state
    <prefix>:{<key_id>}:tokens:<algorithm>     token quota state
    <prefix>:{<key_id>}:credits                burst credit balance (an integer)

With a `tag` (the caller's choice, the same for every call of a key: the service's is its
tenant's with a tenant layer, one for the deployment with a model layer) the key's states
and the shared layers' states all sit under it:

    <prefix>:{<tag>}:k:<key_id>:<role>         the key's own: requests:<algorithm>, credits, ...
    <prefix>:{<tag>}:<layer>:<scope>:<role>    a tenant's or a model's: tenant:acme:tokens:gcra

A shared layer called without a `tag` gets its own, `<layer>:<scope>`: right on one Redis
server (a script may touch any key there), refused (CROSSSLOT) by a Redis Cluster.

Every key written gets its TTL in the same script: the algorithm's `ttl_s` in ms, rounded up,
at least `min_ttl_s`; after it, the state is equivalent to an absent key.

Burst credits are counted in tokens. A request that its base quotas refuse is admitted if the
key's balance holds `max(1, token_cost)` credits; that much is spent and the base quota states
are left untouched (the `RateDecision`s then say why the base quotas refused).

Reservations: `take` reserves the estimated tokens; `settle` gives back what the response did not
use, or takes the excess without refusing. A reservation that never settles stays taken, the
safe direction, and is gone when the state expires (the window passes, or the GCRA's TAT).

Errors, split by who is to blame:

    QuotaStoreError              Redis answered with an error (OOM, MISCONF, a script error, a
    │                            foreign key type): it did not take the quota
    ├── QuotaStoreUnavailable    Redis could not be reached in time
    │   └── QuotaStoreTimeout    no answer in time (it may still run the script)
    └── QuotaStoreBusy           the key's Redis Cluster slot is being migrated (TRYAGAIN):
                                 Redis is up, took nothing, and will answer once it settles
The first two are a Redis failure to the caller (the service's tier fail mode applies);
`QuotaStoreBusy` is routing, not a failure: retry shortly.

Over quota is not an error: it is a `QuotaDecision` with `allowed=False`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import coredis
import coredis.exceptions
import trio
from coredis.commands.script import Script

from backends.redis.cluster_lanes import MOVING_ERRORS
from backends.redis.lua import ADD_CREDITS_SCRIPT, SETTLE_SCRIPT, TAKE_SCRIPT
from backends.redis.pipeliner import RedisPipeliner
from policies.ratelimit import CounterState, LogEntry, LogState, RateDecision
from scheduler.core.quota_store import (
    ALGORITHM_KINDS,
    AlgorithmKind,
    LayerDecision,
    QuotaDecision,
    QuotaLayer,
    QuotaSpec,
    Slot,
)
from scheduler.errors import SchedulerError

__all__ = [
    "ALGORITHM_KINDS",
    "AlgorithmKind",
    "QuotaDecision",
    "QuotaSpec",
    "QuotaStoreBusy",
    "QuotaStoreError",
    "QuotaStoreTimeout",
    "QuotaStoreUnavailable",
    "RedisQuotaStore",
    "Slot",
]

RedisState = float | LogState | CounterState | None
OnSettleError = Callable[["QuotaStoreError"], None]
T = TypeVar("T")
_Entry = tuple[QuotaLayer | None, QuotaSpec, int, bool]  # None: the key's own; delta; paid

_UNAVAILABLE = (
    coredis.exceptions.ConnectionError,  # refused, reset, still loading its dataset
    coredis.exceptions.ReadOnlyError,  # a failover in progress: we reached a replica
    coredis.exceptions.ClusterDownError,
    TimeoutError,
    OSError,
)


class QuotaStoreError(SchedulerError):
    """The quota store could not do what was asked (see the module docstring's tree)."""


class QuotaStoreUnavailable(QuotaStoreError):
    """Redis could not be reached, or did not answer within the store's timeout."""


class QuotaStoreTimeout(QuotaStoreUnavailable):
    """Redis did not answer in time: slow or gone, it cannot say which, and it may still run
    the script it was sent (unlike a refused connection or an error reply, which are definite)."""


class QuotaStoreBusy(QuotaStoreError):
    """The key's Redis Cluster slot is being migrated (TRYAGAIN): Redis is up and did not run
    the script; a retry shortly will find the slot settled. Routing, not a failure."""


class RedisQuotaStore:
    """Quota states and burst credits in Redis, one atomic script per call (a `QuotaStore`,
    `scheduler.core.quota_store`, whose `scheduler.core.memory_quota.MemoryQuotaStore` decides
    the same).

    `redis` is a connected coredis client, entered and left by one task that outlives the store.
    `min_ttl_s` floors every TTL written (Redis' own floor is 1 ms); keeping a state longer than
    its `ttl_s` changes no decision. `timeout_s` bounds every call, raising
    `QuotaStoreUnavailable` when it runs out.
    """

    def __init__(
        self,
        redis: coredis.Redis[Any],
        *,
        prefix: str = "quota",
        min_ttl_s: float = 0.001,
        timeout_s: float | None = None,
        pipeliner: RedisPipeliner | None = None,
    ) -> None:
        """`pipeliner`: send `take` and `settle` through it (the service does), else alone."""
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be non-empty and hold no braces, got {prefix!r}")
        if not math.isfinite(min_ttl_s) or min_ttl_s < 0:
            raise ValueError(f"min_ttl_s must be a finite number >= 0, got {min_ttl_s!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
        self._redis = redis
        self._prefix = prefix
        self._floor_ms = max(1, math.ceil(min_ttl_s * 1000))
        self._timeout_s = timeout_s
        self._pipeliner = pipeliner
        self._take: Script[Any] = redis.register_script(TAKE_SCRIPT)
        self._settle: Script[Any] = redis.register_script(SETTLE_SCRIPT)
        self._add_credits: Script[Any] = redis.register_script(ADD_CREDITS_SCRIPT)

    def key(self, key_id: str, role: str, *, tag: str | None = None) -> str:
        """The Redis key of `role` ("credits", "tokens:gcra", ...) for `key_id`, under `tag`."""
        if not key_id or "{" in key_id or "}" in key_id:
            raise ValueError(f"key_id must be non-empty and hold no braces, got {key_id!r}")
        if tag is None:
            return f"{self._prefix}:{{{key_id}}}:{role}"
        return f"{self._tagged(tag)}k:{key_id}:{role}"

    def layer_key(self, layer: QuotaLayer, role: str, *, tag: str | None = None) -> str:
        """The Redis key of a shared layer's `role` ("requests:gcra", ...), under `tag`."""
        where = f"{layer.name}:{layer.scope}"
        return f"{self._tagged(where if tag is None else tag)}{where}:{role}"

    def state_key(
        self,
        key_id: str,
        slot: Slot,
        spec: QuotaSpec,
        *,
        layer: QuotaLayer | None = None,
        tag: str | None = None,
    ) -> str:
        """The Redis key holding `key_id`'s (or `layer`'s) `slot` quota state under `spec`'s
        algorithm."""
        role = f"{slot}:{spec.algorithm}"
        if layer is None:
            return self.key(key_id, role, tag=tag)
        return self.layer_key(layer, role, tag=tag)

    def _tagged(self, tag: str) -> str:
        if not tag or "{" in tag or "}" in tag:
            raise ValueError(f"a hash tag must be non-empty and hold no braces, got {tag!r}")
        return f"{self._prefix}:{{{tag}}}:"

    async def load_scripts(self) -> None:
        """Load the scripts now (optional: a call that meets NOSCRIPT loads and retries)."""
        for source in (TAKE_SCRIPT, SETTLE_SCRIPT, ADD_CREDITS_SCRIPT):
            await self._call(partial(self._redis.script_load, source))

    async def take(
        self,
        key_id: str,
        *,
        requests: QuotaSpec | None,
        tokens: QuotaSpec | None,
        token_cost: int,
        burst_credits: bool = True,
        now: float | None = None,
        timeout_s: float | None = None,
        enforce: bool = True,
        layers: Sequence[QuotaLayer] = (),
        tag: str | None = None,
    ) -> QuotaDecision:
        """Check and take 1 request and `token_cost` tokens for `key_id` and on each of
        `layers`, all or none, in one script (the rule: `scheduler.core.quota_store`).

        When only the key's own (enforced) quotas refuse and `burst_credits` is on, the
        request is admitted on `max(1, token_cost)` credits if the balance holds them.
        `token_cost` 0 peeks the tokens. `timeout_s` bounds Redis's time for this call
        (through the pipeliner: not counting our own event loop's lag) and raises
        `QuotaStoreUnavailable`: slow, maybe run.
        """
        _check_units(token_cost=token_cost)
        asked = burst_credits and enforce
        credit_cost = max(1, token_cost) if asked else 0
        args: list[str | int] = [_now_arg(now), self._floor_ms, credit_cost]
        keys = [self.key(key_id, "credits", tag=tag)]
        for layer in (None, *layers):
            r, t = (requests, tokens) if layer is None else (layer.requests, layer.tokens)
            on = enforce if layer is None else layer.enforce
            args += [1 if on else 0, *_spec_args(r, 1), *_spec_args(t, token_cost)]
            for slot, spec in (("requests", r), ("tokens", t)):
                role = f"{slot}:{spec.algorithm if spec else 'none'}"
                place = (
                    partial(self.key, key_id) if layer is None else partial(self.layer_key, layer)
                )
                keys.append(place(role, tag=tag))
        reply: Any = await self._run(self._take, keys, args, timeout_s=timeout_s)
        return _parse_take(reply, credits_asked=asked, enforce=enforce, layers=layers)

    async def settle(
        self,
        key_id: str,
        *,
        tokens: QuotaSpec | None,
        reserved: int,
        actual: int,
        paid_with_credits: bool = False,
        now: float | None = None,
        on_error: OnSettleError | None = None,
        layers: Sequence[QuotaLayer] = (),
        tag: str | None = None,
    ) -> None:
        """Settle a reservation of `reserved` tokens that really used `actual`.

        Gives back `reserved - actual` (the algorithm's refund) or takes the excess without
        refusing. A request admitted on credits (`paid_with_credits`, i.e. its decision's
        `credits_spent > 0`) settles against the credit balance instead: the unused part goes
        back to a balance that has not expired, the excess comes out of the balance first and
        out of the token quota for what the balance cannot cover. Each of `layers` (taken
        with this request) settles the same way on its token quota, never on credits.
        """
        _check_units(reserved=reserved, actual=actual)
        if reserved == actual:
            return
        delta = reserved - actual
        entries: list[_Entry] = [(None, tokens, delta, paid_with_credits)] if tokens else []
        entries += [(layer, layer.tokens, delta, False) for layer in layers if layer.tokens]
        await self._run_settle(key_id, "tokens", entries, now, on_error, tag)

    async def give_back_request(
        self,
        key_id: str,
        *,
        requests: QuotaSpec | None,
        credits: int = 0,
        now: float | None = None,
        on_error: OnSettleError | None = None,
        layers: Sequence[QuotaLayer] = (),
        tag: str | None = None,
    ) -> None:
        """Give back the request taken at admission, for a call the backends failed to answer:
        one unit to the request quota or, for a request admitted on burst credits, `credits`
        to a balance that has not expired; and one unit to each of `layers`."""
        _check_units(credits=credits)
        entries: list[_Entry] = [(None, requests, credits or 1, credits > 0)] if requests else []
        entries += [(layer, layer.requests, 1, False) for layer in layers if layer.requests]
        await self._run_settle(key_id, "requests", entries, now, on_error, tag)

    async def _run_settle(
        self,
        key_id: str,
        slot: Slot,
        entries: list[_Entry],
        now: float | None,
        on_error: OnSettleError | None,
        tag: str | None,
    ) -> None:
        """The settle script over `entries` (a layer, None for the key's own; its spec; the
        delta; paid with credits), waited for; or, with `on_error` and a pipeliner, queued
        without waiting (this coroutine then never suspends) and its failure told to
        `on_error`."""
        if not entries:
            return
        keys = [self.key(key_id, "credits", tag=tag)]
        args: list[str | int] = [_now_arg(now), self._floor_ms]
        for layer, spec, delta, paid in entries:
            keys.append(self.state_key(key_id, slot, spec, layer=layer, tag=tag))
            args += [*_spec_args(spec, 0)[:4], delta, 1 if paid else 0]
        if on_error is None or self._pipeliner is None:
            await self._run(self._settle, keys, args)
            return

        def failed(error: BaseException) -> None:
            on_error(_translated(error) or QuotaStoreError(f"redis failed: {error!r}"))

        self._pipeliner.evalsha_soon(self._settle, keys, args, failed)

    async def add_credits(
        self,
        key_id: str,
        amount: int,
        *,
        ttl_s: float,
        now: float | None = None,
        tag: str | None = None,
    ) -> int:
        """Add `amount` credits (tokens) to `key_id`'s balance; return the new balance.

        The balance expires `ttl_s` from now, or later if it already did. Its expiry is
        Redis's own TTL clock, so `now` (the role's) changes nothing here.
        """
        _check_units(amount=amount)
        if amount < 1:
            raise ValueError(f"amount must be an integer >= 1, got {amount!r}")
        if not math.isfinite(ttl_s) or ttl_s <= 0:
            raise ValueError(f"ttl_s must be a finite number > 0, got {ttl_s!r}")
        keys = [self.key(key_id, "credits", tag=tag)]
        args = [amount, max(1, math.ceil(ttl_s * 1000))]
        return int(await self._call(lambda: self._add_credits(keys=keys, args=args)))

    async def credits(
        self, key_id: str, *, now: float | None = None, tag: str | None = None
    ) -> int:
        """`key_id`'s burst credit balance (0 when it has none or it expired; Redis's TTL
        clock says when, whatever `now`)."""
        key = self.key(key_id, "credits", tag=tag)
        value = await self._call(lambda: self._redis.get(key))
        return 0 if value is None else int(value)

    async def state(
        self,
        key_id: str,
        *,
        slot: Slot,
        spec: QuotaSpec,
        layer: QuotaLayer | None = None,
        tag: str | None = None,
    ) -> RedisState:
        """The stored state, in the shape of `spec`'s Python algorithm (for tests and debugging).

        An empty log reads as None, which the algorithms treat like `()`.
        """
        key = self.state_key(key_id, slot, spec, layer=layer, tag=tag)
        if spec.algorithm == "gcra":
            raw = await self._call(lambda: self._redis.get(key))
            return None if raw is None else float(raw)
        if spec.algorithm == "sliding_log":
            entries = await self._call(lambda: self._redis.lrange(key, 0, -1))
            log = tuple(LogEntry(float(at), int(cost)) for at, _, cost in map(_split, entries))
            return log or None
        fields: Any = await self._call(lambda: self._redis.hmget(key, ["w", "c", "p", "period"]))
        window, current, previous, period = fields
        if window is None or float(period) != spec.quota.period_s:
            return None
        return CounterState(int(window), int(current), int(previous))

    async def _run(
        self,
        script: Script[Any],
        keys: list[str],
        args: list[str | int],
        *,
        timeout_s: float | None = None,
    ) -> Any:
        pipeliner = self._pipeliner
        if pipeliner is not None:
            return await self._call(
                partial(pipeliner.evalsha, script, keys, args, timeout_s=timeout_s)
            )

        async def alone() -> Any:
            with trio.fail_after(math.inf if timeout_s is None else timeout_s):
                return await script(keys=keys, args=args)

        return await self._call(alone)

    async def _call(self, request: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis request; the one place where coredis' and trio's errors are translated.

        Without a `timeout_s` of its own the caller times the call (the pipeliner's round
        trip, bounded by the call's `timeout_s`): running out is the same QuotaStoreUnavailable."""
        try:
            if self._timeout_s is None:
                return await request()
            with trio.fail_after(self._timeout_s):
                return await request()
        except (trio.TooSlowError, TimeoutError) as exc:
            within = "the call's timeout_s" if self._timeout_s is None else f"{self._timeout_s} s"
            raise QuotaStoreTimeout(f"redis did not answer within {within}") from exc
        except Exception as exc:
            error = _translated(exc)
            if error is None:
                raise
            raise error from exc


def _translated(exc: BaseException) -> QuotaStoreError | None:
    """The store's error for a coredis or trio error (None: not one of theirs)."""
    if isinstance(exc, trio.TooSlowError | TimeoutError):
        return QuotaStoreTimeout("redis did not answer in time")
    if isinstance(exc, _UNAVAILABLE):
        return QuotaStoreUnavailable(f"redis is unreachable: {exc}")
    if isinstance(exc, MOVING_ERRORS):  # TRYAGAIN, or redirects not settled in coredis's tries
        return QuotaStoreBusy(f"the key's slot is moving: {exc}")
    if isinstance(exc, coredis.exceptions.RedisError):
        return QuotaStoreError(f"redis refused a quota command: {exc}")
    return None


def _check_units(**units: int) -> None:
    for name, value in units.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _now_arg(now: float | None) -> str:
    if now is None:
        return ""
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite time, got {now!r}")
    return repr(float(now))


def _spec_args(spec: QuotaSpec | None, cost: int) -> list[str | int]:
    if spec is None:
        return ["", 0, "0", 0, 0]
    quota = spec.quota
    return [spec.algorithm, quota.limit, repr(quota.period_s), quota.burst, cost]


def _split(entry: bytes | str) -> tuple[str, str, str]:
    text = entry.decode() if isinstance(entry, bytes) else entry
    return text.partition(":")


def _rate_decision(fields: list[Any]) -> RateDecision | None:
    present, allowed, limit, remaining, retry_s, reset_s = fields
    if not int(present):
        return None
    return RateDecision(
        allowed=bool(int(allowed)),
        limit=int(limit),
        remaining=int(remaining),
        retry_after_s=float(retry_s),
        reset_after_s=float(reset_s),
    )


def _parse_take(
    reply: Any, *, credits_asked: bool, enforce: bool, layers: Sequence[QuotaLayer]
) -> QuotaDecision:
    values = list(reply)
    requests = _rate_decision(values[4:10])
    tokens = _rate_decision(values[10:16])
    shared = tuple(
        LayerDecision(
            layer,
            _rate_decision(values[16 + 12 * i : 22 + 12 * i]),
            _rate_decision(values[22 + 12 * i : 28 + 12 * i]),
        )
        for i, layer in enumerate(layers)
    )
    allowed = bool(int(values[0]))
    enforced = [(requests, tokens)] if enforce else []
    enforced += [(x.requests, x.tokens) for x in shared if x.layer.enforce]
    refusals = [d.retry_after_s for pair in enforced for d in pair if d and not d.allowed]
    return QuotaDecision(
        allowed=allowed,
        requests=requests,
        tokens=tokens,
        credits_spent=int(values[1]),
        credits_left=int(values[2]) if credits_asked else None,
        retry_after_s=0.0 if allowed or not refusals else max(refusals),
        decided_at=float(values[3]),
        layers=shared,
    )
