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
import json
import logging
import signal
import threading
from typing import Any

import coredis
import trio

from backends.http import BackendPool, HttpBackend
from backends.http_client import HttpClient
from backends.pressure import PoolPressure
from backends.redis_cache import ResponseCache
from backends.redis_pipeliner import RedisPipeliner
from backends.redis_quota import QuotaStoreError, RedisQuotaStore
from policies.breaker import BreakerConfig, BreakerState, CircuitBreaker
from scheduler.core import AIMDConfig, AIMDController, Scheduler, SchedulerConfig
from scheduler.service.config import (
    ConfigError,
    Settings,
    gains_from_dict,
    gains_to_dict,
    load_settings,
)
from scheduler.service.dispatcher import Dispatcher
from scheduler.service.gateway import Gateway
from scheduler.service.metrics import GatewayMetrics
from scheduler.service.quota import AdaptiveTimeout, QuotaGuard
from scheduler.service.tenancy import KeyRegistry

log = logging.getLogger("scheduler.service")
READY_TIMEOUT_S = 0.2
GAINS_KEY = "control:gains"  # {"version": n, "gains": {...}}, written by the admin API
GAINS_POLL_S = 0.5
WARM_CONNECTIONS = 32
REDIS_ERRORS = (coredis.exceptions.RedisError, OSError, trio.TooSlowError)


class Replica:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.controller = AIMDController(settings.controller)
        self.breaker = CircuitBreaker(BreakerConfig(failure_threshold=3, open_s=0.5))
        self.redis_timeout = AdaptiveTimeout(settings.redis_timeout_s)
        self.registry = KeyRegistry(
            settings.keys,
            settings.key_secret,
            prefix=f"{settings.redis_prefix}:tenancy",
            timeout=self.redis_timeout,
            breaker=self.breaker,
        )
        self._gains_key = f"{settings.redis_prefix}:{GAINS_KEY}"
        self.quota = QuotaGuard(
            None, self.breaker, replicas=settings.replicas, timeout=self.redis_timeout
        )
        self.metrics = GatewayMetrics.from_settings(settings)
        self._gateway: Gateway | None = None
        self._client = HttpClient(settings.backend_limits)
        self._redis: coredis.Redis[bytes] | None = None
        self._cache: ResponseCache | None = None
        self._gains_version = 0
        self.pressure: dict[str, PoolPressure] = {}

    @property
    def gateway(self) -> Gateway:
        if self._gateway is None:
            raise RuntimeError("the replica has not started")
        return self._gateway

    async def start(self, nursery: trio.Nursery) -> None:
        settings = self.settings
        core = Scheduler(
            SchedulerConfig(tuple(t.core for t in settings.tiers), settings.gate),
            self.controller,
            now=trio.current_time(),
        )
        self.pressure = {
            m.name: PoolPressure.for_backends(
                [(url, m.pressure) for url in m.backends], self._client
            )
            for m in settings.models
        }
        dispatcher = Dispatcher(
            core, tick_s=lambda: self.controller.config.tick_s, pressure=self.current_pressure
        )
        pools = {
            m.name: BackendPool([HttpBackend(url, self._client) for url in m.backends])
            for m in settings.models
        }
        if settings.redis_url:
            await nursery.start(self._hold_redis, settings.redis_url)
            nursery.start_soon(self._follow_gains)
        await nursery.start(dispatcher.run)

        def export_metrics(now: float) -> None:
            self.metrics.update_from(core.statistics())
            self.metrics.controller_config(self.controller.config)
            self.metrics.update_redis(
                errors_total=self.quota.redis_errors,
                up=self.quota.redis_up,
                breaker=self.breaker.state,
            )

        dispatcher.on_tick.append(export_metrics)
        for pool in pools.values():
            nursery.start_soon(pool.probe_forever)
        for probes in self.pressure.values():
            nursery.start_soon(probes.run)
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
        )
        # what start-up built lives as long as the process: keep it out of the collector's
        # full passes, whose pauses (50-160 ms) would otherwise exceed the Redis timeout
        gc.collect()
        gc.freeze()

    async def _hold_redis(self, url: str, *, task_status: trio.TaskStatus[None]) -> None:
        """coredis's client runs its own tasks: one task enters and leaves its context."""
        async with coredis.Redis.from_url(url) as redis, trio.open_nursery() as nursery:
            # its round trips time out after every caller's deadline, never before
            pipeliner = RedisPipeliner(redis, timeout_s=2 * self.redis_timeout.ceiling_s)
            await nursery.start(pipeliner.run)
            self._redis = redis
            self.registry.pipeliner = pipeliner
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
            with trio.move_on_after(2.0), contextlib.suppress(*REDIS_ERRORS, QuotaStoreError):
                await store.load_scripts()

                async def ping() -> None:
                    await redis.ping()

                async with trio.open_nursery() as warm:  # open the pool's connections
                    for _ in range(WARM_CONNECTIONS):
                        warm.start_soon(ping)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._redis = self.registry.pipeliner = self.quota.store = None

    def current_pressure(self) -> float:
        """The backends' pressure for the controller: the most loaded model's pool."""
        now = trio.current_time()
        return max((p.pressure(now) for p in self.pressure.values()), default=0.0)

    async def publish_gains(self, config: AIMDConfig) -> None:
        """Apply new gains here at once, and in Redis for the other replicas."""
        self.controller.configure(config)
        redis = self._redis
        if redis is None:
            return
        with trio.move_on_after(1.0):
            version = await redis.incr(self._gains_key + ":version")
            document = {"version": version, "gains": gains_to_dict(config)}
            await redis.set(self._gains_key, json.dumps(document))
            self._gains_version = version

    async def _follow_gains(self) -> None:
        """Take up gains another replica's admin API published."""
        while True:
            await trio.sleep(GAINS_POLL_S)
            redis = self._redis
            if redis is None:
                continue
            try:
                with trio.fail_after(READY_TIMEOUT_S):
                    raw = await redis.get(self._gains_key)
            except REDIS_ERRORS:
                continue
            if not raw:
                continue
            document = json.loads(raw)
            if document["version"] > self._gains_version:
                self.controller.configure(gains_from_dict(document["gains"]))
                self._gains_version = document["version"]

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
                await self.publish_gains(fresh.controller)
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
        self.metrics.close()
        self._client.close()

    async def readiness(self) -> dict[str, Any]:
        checks: dict[str, Any] = {}
        gateway = self.gateway
        checks["backends"] = {
            "ok": all(pool.any_healthy for pool in gateway.pools.values()),
            "models": {name: pool.any_healthy for name, pool in gateway.pools.items()},
        }
        checks["draining"] = {"ok": not gateway.dispatcher.core.draining}
        breaker = self.breaker.state
        if self._redis is None:
            checks["redis"] = {"ok": False, "error": "no Redis configured"}
        else:
            try:
                with trio.fail_after(READY_TIMEOUT_S):
                    await self._redis.ping()
                checks["redis"] = {"ok": True, "breaker": breaker.value}
            except (trio.TooSlowError, coredis.exceptions.RedisError, OSError) as exc:
                checks["redis"] = {
                    "ok": False,
                    "error": type(exc).__name__,
                    "breaker": breaker.value,
                }
        if breaker is not BreakerState.CLOSED:
            checks["redis"]["ok"] = False
        return checks
