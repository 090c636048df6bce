"""One replica's long-lived parts, built inside trio when the app starts serving.

Every process is a replica: it has its own scheduling core, controller and backend pools;
quotas, keys and the cache (in Redis) are what replicas share. The parts are built in the
app's `before_serving` hook so that the core is told trio's time, and its tasks (the
dispatcher, the backend probes, the Redis client) live in the app's nursery: if one fails,
the replica fails.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import threading
from functools import partial
from typing import Any

import coredis
import trio

from backends.http.client import HttpClient
from backends.http.pool import BackendPool, HttpBackend
from backends.probes.metrics import PoolPressure
from backends.redis.cache import ResponseCache
from backends.redis.errors import RedisUnavailable, translated_redis_errors
from backends.redis.keys import RedisKeyStore
from backends.redis.pipeliner import RedisPipeliner
from backends.redis.quota import QuotaStoreError, RedisQuotaStore
from backends.redis.topology import open_redis, shard_of, shards
from policies.breaker import BreakerConfig, ScopedBreakers
from scheduler.core import AIMDController, Scheduler, SchedulerConfig
from scheduler.service.config import ConfigError, Settings, load_settings
from scheduler.service.dispatcher import Dispatcher
from scheduler.service.gains import GainsOwner
from scheduler.service.gateway import Gateway
from scheduler.service.health import RedisHealth
from scheduler.service.levers import LEVERS, LEVERS_KEY, Levers, LeversOwner
from scheduler.service.metrics import GatewayMetrics
from scheduler.service.quota import AdaptiveTimeout, FailMode, QuotaGuard
from scheduler.service.supervisor import DrainFlag
from scheduler.service.tenancy import KeyRegistry
from scheduler.service.tracing import flush_tracing, start_tracing

log = logging.getLogger("scheduler.service")
GAINS_KEY = "control:gains"  # {"version": n, "gains": {...}}, written by the admin API
WARM_CONNECTIONS = 32
# The collector's thresholds once serving (Python's defaults: 700, 10, 10). The serving path
# makes almost no reference cycles, so a pass finds next to nothing while it walks every
# request in flight: at the defaults, 13-18% of a worker's CPU on 2,000 streams and full passes
# of 45-150 ms of CPU over 150,000-275,000 objects, longer than the Redis timeout. A young pass
# every 10,000 net allocations, and a middle one every 5 of them (at 10 a middle pass walked
# ~100,000 objects in flight, ~30 ms), left 8% (bench/RESULTS.md, "The garbage collector").
# A full pass every 2 middle ones, not 10: a connection's objects live long enough to reach
# the oldest generation, and only a full pass frees them once it closes; at 10 there was no
# full pass at all, and 3 rounds of 2,000 idle connections grew the gateway by 13 MB
# (tests/service/test_idle_memory.py; at 2, as at the defaults, it stays flat, and CPU per
# answer at c=128 with the quota was the same within noise: 0.741/0.770 against 0.722/0.763 ms).
GC_THRESHOLDS = (10_000, 5, 2)


class Replica:
    def __init__(self, settings: Settings, *, drain_flag: DrainFlag | None = None) -> None:
        self.settings = settings
        # the operator's drain, shared by every worker process of a `--workers N` gateway
        self.drain_flag = drain_flag or DrainFlag()
        self.controller = AIMDController(settings.controller)
        # one breaker per Redis Cluster shard (one in all off a cluster)
        self.breakers = ScopedBreakers(BreakerConfig(failure_threshold=3, open_s=0.5))
        self.redis_health = RedisHealth(self.breakers)
        self.redis_timeout = AdaptiveTimeout(settings.redis_timeout_s)
        self.registry = KeyRegistry(
            settings.keys,
            settings.key_secret,
            timeout=self.redis_timeout,
            breakers=self.breakers,
            scope_of=self._shard_of,
        )
        self.quota = QuotaGuard(
            None,
            self.breakers,
            replicas=settings.replicas,
            timeout=self.redis_timeout,
            scope_of=self._shard_of,
        )
        self.metrics = GatewayMetrics.from_settings(settings)
        # the controller's gains change only through it (admin API, Redis, SIGHUP)
        self.gains = GainsOwner(
            self.controller,
            key=f"{settings.redis_prefix}:{GAINS_KEY}",
            shared=bool(settings.redis_url),
            redis=lambda: self._redis,
            metrics=self.metrics,
        )
        # the SRE's emergency levers, shared by every replica like the gains
        self.levers = LeversOwner(
            Levers(),
            LEVERS,
            key=f"{settings.redis_prefix}:{LEVERS_KEY}",
            shared=bool(settings.redis_url),
            redis=lambda: self._redis,
        )
        self._gateway: Gateway | None = None
        self._client = HttpClient(settings.backend_limits)
        self._redis: coredis.Redis[bytes] | None = None
        self._cache: ResponseCache | None = None
        self.pressure: dict[str, PoolPressure] = {}

    def _shard_of(self, key_id: str) -> str:
        """The breaker scope of a key: the Redis Cluster node serving its slot."""
        return shard_of(self._redis, key_id)

    @property
    def gateway(self) -> Gateway:
        if self._gateway is None:
            raise RuntimeError("the replica has not started")
        return self._gateway

    async def start(self, nursery: trio.Nursery) -> None:
        start_tracing()  # in every serving process: the OTEL_* variables' exporters
        settings = self.settings
        pools = {
            m.name: BackendPool(
                [HttpBackend(url, self._client, api_key=m.api_key) for url in m.backends]
            )
            for m in settings.models
        }
        self.pressure = {
            m.name: PoolPressure.for_backends(
                [(url, m.pressure) for url in m.backends],
                self._client,
                in_rotation=pools[m.name].in_rotation,
                api_key=m.api_key,
            )
            for m in settings.models
        }
        dispatcher = self._dispatcher()
        if settings.redis_url:
            await nursery.start(self._hold_redis, settings.redis_url)
            await nursery.start(self.redis_health.watch, lambda: self._redis)
        await nursery.start(self.gains.run)
        await nursery.start(self.levers.run)
        await nursery.start(dispatcher.run)
        dispatcher.on_tick.append(partial(self._export_metrics, dispatcher.core))
        await self._start_backends(nursery, pools)
        if settings.source is not None and threading.current_thread() is threading.main_thread():
            nursery.start_soon(self._reload_gains_on_sighup, settings.source)
        self._gateway = Gateway(
            settings,
            dispatcher,
            pools,
            registry=self.registry,
            quota=self.quota,
            cache=self._cache,
            background=nursery,
            metrics=self.metrics,
            levers=self.levers,
        )
        settle_collector()

    def _dispatcher(self) -> Dispatcher:
        """The scheduling core, told trio's time, and the task that will own it."""
        settings = self.settings
        core = Scheduler(
            SchedulerConfig(tuple(t.core for t in settings.tiers), settings.gate),
            self.controller,
            now=trio.current_time(),
        )
        return Dispatcher(
            core,
            tick_s=lambda: self.controller.config.tick_s,
            pressure=self.current_pressure,
            drained=self.drain_flag.is_set,
        )

    async def _start_backends(self, nursery: trio.Nursery, pools: dict[str, BackendPool]) -> None:
        """Every backend probed once (together) before it returns, and the pressure probes
        running."""
        async with trio.open_nursery() as starting:
            for pool in pools.values():
                starting.start_soon(nursery.start, pool.probe_forever)
        for probes in self.pressure.values():
            nursery.start_soon(probes.run)

    def _export_metrics(self, core: Scheduler, now: float) -> None:
        """Every controller tick: the core's, the controller's and Redis's state."""
        self.metrics.update_from(core.statistics())
        self.metrics.update_fairness(now=now)
        self.metrics.controller_config(self.controller.config)
        in_use = shards(self._redis)
        if in_use is not None:
            self.breakers.retain(in_use)
        self.metrics.update_redis(
            errors_total=self.quota.redis_errors,
            up=self.quota.redis_up,
            breaker=self.breakers.state,
        )
        if self.settings.redis_url:
            self.redis_health.observe(now=now)

    async def _hold_redis(self, url: str, *, task_status: trio.TaskStatus[None]) -> None:
        """coredis's client runs its own tasks: one task enters and leaves its context."""
        opened = open_redis(url, self.settings.redis_secrets)  # single, cluster or sentinel
        async with opened as redis, trio.open_nursery() as nursery:
            # its round trips time out after every caller's deadline, never before
            pipeliner = RedisPipeliner(redis, timeout_s=2 * self.redis_timeout.ceiling_s)
            await nursery.start(pipeliner.run)
            self._redis = redis
            self.registry.store = RedisKeyStore(
                pipeliner, prefix=f"{self.settings.redis_prefix}:tenancy"
            )
            # no timeout of its own: the quota guard times each call (adaptively)
            self.quota.store = store = RedisQuotaStore(
                redis, prefix=f"{self.settings.redis_prefix}:quota", pipeliner=pipeliner
            )
            self._cache = ResponseCache(
                redis,
                prefix=f"{self.settings.redis_prefix}:cache",
                timeout_s=self.settings.redis_timeout_s,
                pipeliner=pipeliner,
            )
            # warm up: scripts loaded and a connection open before the first request, so a
            # cold burst does not time out on script compiles and connection set-up
            with trio.move_on_after(2.0), contextlib.suppress(RedisUnavailable, QuotaStoreError):
                await store.load_scripts()

                async def ping() -> None:
                    with translated_redis_errors():
                        await redis.ping()

                async with trio.open_nursery() as warm:  # open the pool's connections
                    for _ in range(WARM_CONNECTIONS):
                        warm.start_soon(ping)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._redis = self.registry.store = self.quota.store = None

    def current_pressure(self) -> tuple[float, float]:
        """The backends' pressure for the controller (the most loaded model's pool), and
        when the oldest scrape behind it was taken."""
        now = trio.current_time()
        pools = self.pressure.values()
        pressure = max((p.pressure(now) for p in pools), default=0.0)
        return pressure, min((p.scraped_at(now) for p in pools), default=now)

    async def _reload_gains_on_sighup(self, path: str) -> None:
        """SIGHUP: read the config file again and apply its controller gains (only those;
        the rest needs a restart). A bad file is reported and changes nothing."""
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                try:
                    fresh = load_settings(path)
                except ConfigError as exc:
                    log.error("SIGHUP: config not reloaded: %s", exc)
                    continue
                try:
                    await self.gains.replace(fresh.controller, deadline_at=trio.current_time() + 1)
                except (RedisUnavailable, trio.TooSlowError) as exc:
                    log.error("SIGHUP: controller gains not reloaded, Redis failed: %r", exc)
                    continue
                log.warning("SIGHUP: controller gains reloaded from %s", path)

    def drain(self) -> None:
        self.gateway.dispatcher.drain()

    async def drain_and_wait(self, timeout_s: float) -> None:
        """Drain, then wait until nothing is queued or in flight (at most `timeout_s`)."""
        self.drain()
        core = self.gateway.dispatcher.core
        with trio.move_on_after(timeout_s):
            while core.gate.inflight or core.depth or not core.draining:
                await trio.sleep(0.05)

    async def stop(self) -> None:
        await trio.to_thread.run_sync(flush_tracing)  # the batched spans leave before exit
        self.metrics.close()
        self._client.close()

    async def readiness(self) -> dict[str, Any]:
        """`{"ready": bool, "checks": {...}}`: ready when this replica can serve traffic (not
        draining, some model with a healthy backend, and Redis up unless some tier can admit
        without it). A model without a healthy backend, or Redis down, is reported in the
        checks without failing readiness while the replica can still serve."""
        gateway = self.gateway
        models = {
            name: {"healthy": pool.healthy_count, "total": len(pool.backends)}
            for name, pool in gateway.pools.items()
        }
        backends_ok = any(m["healthy"] for m in models.values())
        draining = gateway.dispatcher.draining
        redis = self._redis_check()
        ready = backends_ok and not draining and (redis["ok"] or not redis["required"])
        checks = {
            "backends": {"ok": backends_ok, "models": models},
            "draining": {"ok": not draining},
            "redis": redis,
        }
        return {"ready": ready, "checks": checks}

    def _redis_check(self) -> dict[str, Any]:
        """Redis's state; `required` when no tier could admit a request without it (every
        tier with a quota fails closed): only then does Redis down make the replica unready."""
        required = not any(
            t.fail_mode is FailMode.OPEN or t.quotas.unlimited for t in self.settings.tiers
        )
        if not self.settings.redis_url:
            return {"ok": False, "required": required, "error": "no Redis configured"}
        error = self.redis_health.error(now=trio.current_time())
        check: dict[str, Any] = {
            "ok": error is None,
            "required": required,
            "breaker": self.breakers.state.value,
        }
        if self.redis_health.shards_down:
            check["shards_down"] = self.redis_health.shards_down
        if error is not None:
            check["error"] = error
        return check


def settle_collector() -> None:
    """The collector's policy for a serving process, applied once start-up is done: what
    start-up built lives as long as the process and is frozen out of every pass (a full pass
    over it took 50-160 ms), and the passes run at `GC_THRESHOLDS`."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
