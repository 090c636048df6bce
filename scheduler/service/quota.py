"""Per-key quotas at the edge: Redis when it answers, the tier's fail mode when it does not.

Why a guard around the store: quotas must hold exactly across replicas, so Redis decides.
But a request must never wait long on Redis: each call has a short (adaptive) timeout, and a
circuit breaker stops calling Redis after a run of failures. The timeout counts Redis's time,
not our event loop's lag (the pipeliner discounts it, `backends.redis.pipeliner`): a gateway
whose CPU is saturated answers slower, it does not take itself for a slow Redis and refuse.
An error reply (OOM, MISCONF, READONLY, a script error) is a failure too, and a definite one.
While Redis is down (refusing connections, answering errors, or silent for DOWN_AFTER_S),
each tier follows its fail mode: `open` admits under a local in-process limiter at the key's
quota divided by the replica count (so the fleet stays near the quota), except for keys Redis
last said were used up, until their reset; `closed` refuses with a 503. A Redis that is only
slow (a timeout, a pause just begun) may still have run the script: admitting then could
count a request twice and over-admit, so the answer is 503 "retry in 1 s".

Shadow mode: a quota with `enforce = false` is decided exactly as an enforced one (the script
counts what it admits and refuses what would not fit), but a refusal is turned into an
admission marked `would_refuse`: it took nothing, so it holds nothing to settle, and the
gateway reports it (header and metric) instead of answering 429. The counts therefore follow
what enforcing the quota would have admitted, so "would have refused" is what enforcing it
would refuse. It spends no burst credits (a real balance) on what it would refuse.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from backends.redis.quota import QuotaStoreBusy, QuotaStoreError, QuotaStoreTimeout
from policies.breaker import BreakerState, ScopedBreakers
from policies.health import quota_factor, scaled_limit
from policies.ratelimit import Quota, RateDecision
from scheduler.core.memory_quota import MemoryQuotaStore
from scheduler.core.quota_store import (
    AlgorithmKind,
    LayerDecision,
    QuotaDecision,
    QuotaLayer,
    QuotaSpec,
    QuotaStore,
    Reservation,
    completed,
)

T = TypeVar("T")
SPENT_KEYS_MAX = 100_000  # keys remembered as used up, for the fail-open limiter
DOWN_AFTER_S = 2.0  # Redis answering nothing for this long is down, not just slow


class AdaptiveTimeout:
    """The timeout of a Redis call, set like TCP's retransmission timeout: the smoothed
    duration of recent calls plus four deviations, within [floor_s, ceiling_s].

    Why adaptive: a call's duration includes the time this process's event loop takes to get
    back to it. Under a burst that is tens of ms while Redis answered in one. The pipeliner
    does not count the loop's lag against the timeout; what is left of it (a busy loop that
    still ticks on time) this absorbs. A Redis that stops answering still trips it fast."""

    def __init__(self, floor_s: float, ceiling_s: float = 1.0) -> None:
        self.floor_s = floor_s
        self.ceiling_s = max(floor_s, ceiling_s)
        self._mean_s = 0.0
        self._deviation_s = 0.0

    def current(self) -> float:
        return min(self.ceiling_s, max(self.floor_s, self._mean_s + 4 * self._deviation_s))

    def observe(self, duration_s: float) -> None:
        error = duration_s - self._mean_s
        self._mean_s += error / 8
        self._deviation_s += (abs(error) - self._deviation_s) / 4


class FailMode(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class QuotaSettings:
    """A key's request and token quotas over `period_s` (0 = no such quota), and its cap on
    requests open at once (`scheduler.service.controls`); with `enforce` off, a shadow quota
    (counted and reported, never refusing)."""

    algorithm: AlgorithmKind = "sliding_log"
    period_s: float = 60.0
    requests: int = 0
    tokens: int = 0
    request_burst: int = 0  # GCRA only; 0 = the limit
    token_burst: int = 0
    enforce: bool = True
    max_concurrency: int = 0  # the key's requests open at once, per replica; 0 = no cap
    congested_factor: float = 1.0  # the limits' fraction while congested (`policies.health`)
    scaled_by: float = 1.0  # the factor these limits are under now (`under_congestion`)

    _specs: tuple[QuotaSpec | None, QuotaSpec | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def spec(limit: int, burst: int) -> QuotaSpec | None:
            if limit <= 0:
                return None
            return QuotaSpec(self.algorithm, Quota(limit, self.period_s, burst or None))

        specs = spec(self.requests, self.request_burst), spec(self.tokens, self.token_burst)
        object.__setattr__(self, "_specs", specs)  # worked out once, not per request

    def specs(self) -> tuple[QuotaSpec | None, QuotaSpec | None]:
        return self._specs

    def under_congestion(self, congested: bool) -> QuotaSettings:
        """These quotas as they apply now: each limit (and burst) times `congested_factor`
        while the controller reports congestion (`policies.health`), else themselves."""
        factor = quota_factor(self.congested_factor, congested=congested)
        if factor == 1:
            return self
        return dataclasses.replace(
            self,
            requests=scaled_limit(self.requests, factor),
            tokens=scaled_limit(self.tokens, factor),
            request_burst=scaled_limit(self.request_burst, factor),
            token_burst=scaled_limit(self.token_burst, factor),
            scaled_by=factor,
        )

    @property
    def unlimited(self) -> bool:
        return self.requests <= 0 and self.tokens <= 0


class Source(enum.Enum):
    REDIS = "redis"
    LOCAL = "local"  # fail-open limiter while Redis is out
    UNLIMITED = "unlimited"
    CLOSED = "closed"  # fail-closed refusal while Redis is out
    UNVERIFIED = "unverified"  # Redis slow, not known down: refused, retry in a second
    MOVING = "moving"  # the key's Redis Cluster slot is moving: refused, retry in a second


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    source: Source
    requests: RateDecision | None = None
    tokens: RateDecision | None = None
    retry_after_s: float = 0.0
    credits_spent: int = 0
    credits_left: int | None = None
    period_s: float = 60.0
    failing_s: float = math.nan  # CLOSED, UNVERIFIED: how long Redis has been failing
    spent: str = ""  # LOCAL, refused by Redis's last word: "requests" or "tokens"
    would_refuse: bool = False  # a shadow quota's refusal, admitted (it took nothing)
    scaled_by: float = 1.0  # the factor the limits were under (`QuotaSettings.scaled_by`)
    layers: tuple[LayerDecision, ...] = ()  # the shared layers' (its tenant's, its model's)

    @property
    def key_fits(self) -> bool:
        """The key's own quotas admit it (whether or not they are enforced)."""
        return all(d.allowed for d in (self.requests, self.tokens) if d is not None)


class QuotaGuard:
    """Decides quota for one request; one per replica."""

    def __init__(
        self,
        store: QuotaStore | None,
        breakers: ScopedBreakers,
        *,
        replicas: int,
        timeout: AdaptiveTimeout,
        scope_of: Callable[[str], str] = lambda key_id: "",
    ) -> None:
        self.store = store
        self.breakers = breakers
        self.scope_of = scope_of  # a key's Redis Cluster shard: its breaker and failure run
        self.timeout = timeout
        self.replicas = replicas
        self._local = MemoryQuotaStore()  # the fail-open limiter, on this replica's shares
        self._spent_until: dict[str, tuple[float, str]] = {}  # until, and which quota
        # per scope: since when calls fail, and whether the last was refused (or timed out)
        self._failing_since: dict[str, float] = {}
        self._unreachable: dict[str, bool] = {}
        self.redis_errors = 0

    @property
    def redis_up(self) -> bool:
        return self.store is not None and self.breakers.state is BreakerState.CLOSED

    async def check(
        self,
        key_id: str,
        quotas: QuotaSettings,
        fail_mode: FailMode,
        *,
        token_cost: int,
        now: float,
        layers: Sequence[QuotaLayer] = (),
        tag: str | None = None,
    ) -> Verdict:
        """The quota decision for one request of `token_cost` tokens on the key's quotas and
        the shared `layers` (its tenant's, its model's), all kept under the hash tag `tag`; a
        shadow quota's refusal comes back allowed, marked `would_refuse`."""
        verdict = await self._decide(
            key_id, quotas, fail_mode, token_cost=token_cost, now=now, layers=layers, tag=tag
        )
        if quotas.scaled_by != 1 and not quotas.unlimited:
            verdict = dataclasses.replace(verdict, scaled_by=quotas.scaled_by)
        if not verdict.allowed:
            if quotas.enforce or any(layer.enforce for layer in layers):
                return verdict
            return dataclasses.replace(verdict, allowed=True, would_refuse=True)
        shadow_refused = (not quotas.enforce and not verdict.key_fits) or any(
            not d.layer.enforce and not d.fits for d in verdict.layers
        )
        return dataclasses.replace(verdict, would_refuse=True) if shadow_refused else verdict

    async def _decide(
        self,
        key_id: str,
        quotas: QuotaSettings,
        fail_mode: FailMode,
        *,
        token_cost: int,
        now: float,
        layers: Sequence[QuotaLayer],
        tag: str | None,
    ) -> Verdict:
        if quotas.unlimited and not layers:
            return Verdict(True, Source.UNLIMITED)
        requests, tokens = quotas.specs()
        scope = self.scope_of(tag or key_id)
        breaker = self.breakers.get(scope)
        if self.store is not None and breaker.allow(now=now):
            try:
                started = trio.current_time()
                decision = await self.store.take(
                    key_id,
                    requests=requests,
                    tokens=tokens,
                    token_cost=token_cost,
                    timeout_s=self.timeout.current(),
                    burst_credits=quotas.enforce,  # a shadow quota's refusal spends nothing
                    enforce=quotas.enforce,
                    layers=layers,
                    tag=tag,
                )
                self.timeout.observe(trio.current_time() - started)
            except QuotaStoreBusy:
                # the key's slot is moving between nodes: Redis is up and took nothing, so
                # neither the breaker nor the fail mode has a say; the client retries shortly
                return Verdict(False, Source.MOVING, retry_after_s=1.0)
            except QuotaStoreError as exc:
                # an error reply (OOM, MISCONF, a script error) is Redis failing, as a refused
                # connection is, and it is as definite: the script did not take the quota; a
                # timeout is not (the script may run yet): down only after DOWN_AFTER_S
                self.redis_errors += 1
                breaker.record_failure(now=now)
                self._unreachable[scope] = not isinstance(exc, QuotaStoreTimeout)
                self._failing_since.setdefault(scope, now)
            else:
                breaker.record_success(now=now)
                self._failing_since.pop(scope, None)
                self._unreachable.pop(scope, None)
                self._remember(key_id, decision, now)
                return _from_decision(decision, quotas.period_s)
        failing_s = now - self._failing_since.get(scope, now)
        if fail_mode is FailMode.CLOSED:
            open_s = breaker.config.open_s
            return Verdict(False, Source.CLOSED, retry_after_s=open_s, failing_s=failing_s)
        spent_until, spent = self._spent_until.get(key_id, (-math.inf, ""))
        if spent_until > now:  # Redis said this key is used up: that still holds
            return Verdict(False, Source.LOCAL, retry_after_s=spent_until - now, spent=spent)
        if not self._redis_down(scope, now):
            # slow, not gone (our own loop under load, or a pause just begun): the script may
            # have run, so admitting here could count the request twice; retry in a second
            return Verdict(False, Source.UNVERIFIED, retry_after_s=1.0, failing_s=failing_s)
        return self._local_take(key_id, quotas, token_cost, now, layers)

    def hold(
        self,
        key_id: str,
        quotas: QuotaSettings,
        verdict: Verdict,
        *,
        reserved: int,
        tag: str | None = None,
    ) -> QuotaHold | None:
        """What an allowed `verdict` holds of the key's quotas and the shared layers it was
        counted on, to settle when the call ends (None when nothing was taken: refused,
        unlimited, or only shadow quotas that would refuse)."""
        if not verdict.allowed or verdict.source not in (Source.REDIS, Source.LOCAL):
            return None
        local = verdict.source is Source.LOCAL
        layers = tuple(d.layer for d in verdict.layers if d.fits)  # the shares, when local
        requests, tokens = self._shares(quotas) if local else quotas.specs()
        if not verdict.key_fits and not verdict.credits_spent:  # a shadow's: nothing taken
            requests = tokens = None
        if requests is None and tokens is None and not layers:
            return None
        reservation = Reservation(
            key_id, requests, tokens, reserved, verdict.credits_spent, layers, tag
        )
        return QuotaHold(reservation, self, local=local)

    def _settle_in_redis(self, reservation: Reservation, used: int, failed: bool) -> None:
        """Queue the settlement; a request never waits on it (a failure leaves the
        reservation to expire with its window)."""
        store = self.store
        if store is None:  # Redis was turned off since: the reservation expires with its window
            return
        completed(reservation.settle(store, used=used, failed=failed, on_error=self._unsettled))

    def _unsettled(self, error: Exception) -> None:
        if not isinstance(error, QuotaStoreBusy):  # a slot moving is routing, not a failure
            self.redis_errors += 1

    def _redis_down(self, scope: str, now: float) -> bool:
        """The scope's Redis refuses connections, or has not answered for DOWN_AFTER_S."""
        failing_since = self._failing_since.get(scope)
        if failing_since is None:
            return self.store is None
        return self._unreachable.get(scope, False) or now - failing_since >= DOWN_AFTER_S

    def _remember(self, key_id: str, decision: QuotaDecision, now: float) -> None:
        """Keep, per key, until when Redis said its quota is used up (for fail-open mode)."""
        until, spent = -math.inf, ""
        for name, d in (("requests", decision.requests), ("tokens", decision.tokens)):
            if d is None:
                continue
            if not d.allowed and now + d.retry_after_s > until:
                until, spent = now + d.retry_after_s, name
            elif d.allowed and d.remaining <= 0 and now + d.reset_after_s > until:
                until, spent = now + d.reset_after_s, name
        if until <= now:
            self._spent_until.pop(key_id, None)
            return
        self._spent_until.pop(key_id, None)  # re-inserted last: the order is of updates
        if len(self._spent_until) >= SPENT_KEYS_MAX:
            self._spent_until = _pruned(self._spent_until, lambda t: t[0] > now)
        self._spent_until[key_id] = (until, spent)

    def _local_take(
        self,
        key_id: str,
        quotas: QuotaSettings,
        token_cost: int,
        now: float,
        layers: Sequence[QuotaLayer],
    ) -> Verdict:
        """Every layer or none, like the Redis script, on this replica's share of each."""
        requests, tokens = self._shares(quotas)
        shares = [
            dataclasses.replace(
                layer, requests=self._share(layer.requests), tokens=self._share(layer.tokens)
            )
            for layer in layers
        ]
        take = self._local.take(
            key_id,
            requests=requests,
            tokens=tokens,
            token_cost=token_cost,
            burst_credits=False,
            now=now,
            enforce=quotas.enforce,
            layers=shares,
        )
        decision = completed(take)
        return Verdict(
            decision.allowed,
            Source.LOCAL,
            decision.requests,
            decision.tokens,
            decision.retry_after_s,
            period_s=quotas.period_s,
            layers=decision.layers,
        )

    def _shares(self, quotas: QuotaSettings) -> tuple[QuotaSpec | None, QuotaSpec | None]:
        """The key's quotas, each at this replica's share of it."""
        requests, tokens = quotas.specs()
        return self._share(requests), self._share(tokens)

    def _share(self, spec: QuotaSpec | None) -> QuotaSpec | None:
        return spec and QuotaSpec(spec.algorithm, spec.quota.per_replica(self.replicas))


class QuotaHold:
    """What one admitted request holds of its key's quotas, as the gate's `Ticket` holds a
    slot: it ends exactly once (a second `settle` does nothing), by how the call ended."""

    __slots__ = ("_guard", "_local", "_reservation", "settled")

    def __init__(self, reservation: Reservation, guard: QuotaGuard, *, local: bool) -> None:
        self._reservation = reservation
        self._guard = guard
        self._local = local  # the fail-open limiter's, else Redis's
        self.settled = False

    def settle(self, *, used: int, failed: bool, now: float) -> None:
        """Give back the reserved tokens beyond what the call `used` and, when the backends
        `failed` it, the request too. The local limiter takes no use over the estimate: it is
        a stand-in while Redis is out."""
        if self.settled:
            return
        self.settled = True
        reservation, guard = self._reservation, self._guard
        if self._local:
            used = min(used, reservation.reserved)
            completed(reservation.settle(guard._local, used=used, failed=failed, now=now))
        else:
            guard._settle_in_redis(reservation, used, failed)


def _pruned(entries: dict[str, T], keep: Callable[[T], bool]) -> dict[str, T]:
    """The entries `keep` holds for; if that is still nine tenths of them, only the newer
    half: a full map costs one pass per tenth of its size, not one per insertion."""
    kept = {k: v for k, v in entries.items() if keep(v)}
    if len(kept) >= len(entries) * 9 // 10:
        kept = dict(list(kept.items())[len(kept) // 2 :])
    return kept


def _from_decision(decision: QuotaDecision, period_s: float) -> Verdict:
    return Verdict(
        decision.allowed,
        Source.REDIS,
        decision.requests,
        decision.tokens,
        decision.retry_after_s,
        decision.credits_spent,
        decision.credits_left,
        period_s,
        layers=decision.layers,
    )
