"""The gateway and its Redis parts on each topology (single, cluster, sentinel), with keys
spread over every shard of the cluster: quotas exact, cache entries all kept, the admin API
whole, and MOVED taken as routing, never as a failure."""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import trio

from backends.redis.cache import ResponseCache
from backends.redis.quota import QuotaSpec, QuotaStoreUnavailable, RedisQuotaStore
from backends.redis.topology import open_redis, parse_redis_url
from policies.ratelimit import Quota
from scheduler.service.config import ConfigError, load_settings
from scheduler.service.serve import with_demo_url
from tests.conftest import open_pipelined, start_demo, start_gateway
from tests.service.test_admin import ADMIN, CONFIG, TOKEN, chat
from tests.support.redis_topologies import RedisClusterTopology, cli

DEADLINE_S = 30.0
SHARDS = 3


def shards_of(request: pytest.FixtureRequest, tags: list[str]) -> set[int]:
    """The masters serving these hash tags' slots (one 'shard' off a cluster)."""
    if "[cluster]" not in request.node.name:
        return {0}
    cluster: RedisClusterTopology = request.getfixturevalue("redis_cluster")
    slots = [int(cli(cluster.nodes[0].port, "CLUSTER", "KEYSLOT", tag)) for tag in tags]
    return {cluster.slot_owner(slot) for slot in slots}


async def test_token_and_request_quotas_are_exact_on_every_shard(
    redis_topology: str, request: pytest.FixtureRequest
) -> None:
    """Many concurrent takes through the request-path pipeliner (one batch spans every node):
    each key admits exactly its quota, whatever shard its slot is on."""
    expected = SHARDS if "[cluster]" in request.node.name else 1
    kids: list[str] = []
    while not kids or len(shards_of(request, kids)) < expected:  # 12 ids miss one 2% of runs
        kids = [f"k{i}-{uuid.uuid4().hex[:8]}" for i in range(12)]
    requests = QuotaSpec("sliding_log", Quota(5, 60.0))
    tokens = QuotaSpec("gcra", Quota(100, 60.0))
    admitted: dict[str, list[int]] = {kid: [] for kid in kids}
    with trio.fail_after(DEADLINE_S):
        async with open_pipelined(redis_topology) as (redis, pipeliner):
            store = RedisQuotaStore(redis, prefix=f"q-{uuid.uuid4().hex[:8]}", pipeliner=pipeliner)

            async def take(kid: str, cost: int) -> None:
                decision = await store.take(
                    kid, requests=requests, tokens=tokens, token_cost=cost, burst_credits=False
                )
                if decision.allowed:
                    admitted[kid].append(cost)

            async with trio.open_nursery() as nursery:
                for kid in kids[:6]:  # requests bind: 5 of 10 cheap calls
                    for _ in range(10):
                        nursery.start_soon(take, kid, 1)
                for kid in kids[6:]:  # tokens bind: 3 of 10 calls of 30 tokens
                    for _ in range(10):
                        nursery.start_soon(take, kid, 30)
    assert [len(admitted[kid]) for kid in kids] == [5] * 6 + [3] * 6
    assert pipeliner.round_trips < 120  # batched, not one round trip per call


async def test_cache_entries_on_every_shard_are_all_kept(
    redis_topology: str, request: pytest.FixtureRequest
) -> None:
    scopes = [f"tenant-{i}-{uuid.uuid4().hex[:6]}" for i in range(30)]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with trio.fail_after(DEADLINE_S):
        async with open_pipelined(redis_topology) as (redis, pipeliner):
            cache = ResponseCache(redis, prefix=f"c-{uuid.uuid4().hex[:8]}", pipeliner=pipeliner)
            keys = [cache.key(scope, "/v1/chat/completions", body) for scope in scopes]
            if "[cluster]" in request.node.name:
                assert len(shards_of(request, keys)) == SHARDS

            async def put(scope: str) -> None:
                await cache.put(
                    scope, "/v1/chat/completions", body, scope.encode(),
                    now_unix=1000.0, fresh_s=60, stale_s=60,
                )  # fmt: skip

            async with trio.open_nursery() as nursery:
                for scope in scopes:
                    nursery.start_soon(put, scope)
            hits = [
                await cache.get(scope, "/v1/chat/completions", body, now_unix=1001.0)
                for scope in scopes
            ]
    assert [hit.body if hit else None for hit in hits] == [s.encode() for s in scopes]


async def gateways(nursery: trio.Nursery, redis_url: str, tmp_path: Path, count: int) -> list[str]:
    """`count` replicas on one demo backend, sharing one Redis prefix."""
    demo = await start_demo(nursery)
    path = tmp_path / "topology.toml"
    path.write_text(CONFIG.replace("{prefix}", f"topo-{uuid.uuid4().hex}"))
    settings = load_settings(path, env={"SCHEDULER_ADMIN_TOKEN": TOKEN}, overrides={"port": 0})
    settings = dataclasses.replace(with_demo_url(settings, demo), redis_url=redis_url)
    return [await start_gateway(nursery, settings) for _ in range(count)]


async def test_request_quotas_are_exact_through_three_gateways_on_every_shard(
    nursery: trio.Nursery, redis_topology: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Keys made through the admin API, spread over every shard, each with a quota of 3:
    three replicas admit exactly 3 of 6 concurrent requests per key, and Redis never failed."""
    urls = await gateways(nursery, redis_topology, tmp_path, 3)
    statuses: dict[str, list[int]] = {}
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(DEADLINE_S):
            keys: dict[str, str] = {}
            while len(shards_of(request, list(keys))) < SHARDS and len(keys) < 30:
                r = await client.post(
                    urls[0] + "/admin/v1/keys", json={"tenant": "t", "tier": "pro"}, headers=ADMIN
                )
                assert r.status_code == 201
                kid = r.json()["key_id"]
                keys[kid] = r.json()["key"]
                r = await client.put(
                    f"{urls[0]}/admin/v1/keys/{kid}/quota", json={"requests": 3}, headers=ADMIN
                )
                assert r.status_code == 200
                if "[cluster]" not in request.node.name and len(keys) >= 4:
                    break
            listed = (await client.get(urls[1] + "/admin/v1/keys", headers=ADMIN)).text
            assert all(kid in listed for kid in keys)
            await trio.sleep(0.6)  # the registry's cache time

            async def call(key: str, url: str) -> None:
                statuses.setdefault(key, []).append((await chat(client, url, key)).status_code)

            async with trio.open_nursery() as calls:
                for key in keys.values():
                    for i in range(6):
                        calls.start_soon(call, key, urls[i % 3])
            metrics = (await client.get(urls[0] + "/metrics")).text
            ready = await client.get(urls[0] + "/readyz")
    assert all(sorted(s) == [200] * 3 + [429] * 3 for s in statuses.values()), statuses
    assert "scheduler_redis_errors_total 0.0" in metrics
    assert ready.status_code == 200


async def test_token_quotas_hold_through_three_gateways_on_every_shard(
    nursery: trio.Nursery, redis_topology: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Keys spread over every shard, each with a token quota of three requests' reservations,
    eight concurrent requests each through three replicas: at least the three that fit are
    admitted, the tokens the admitted ones used (their usage, which settles the quota) never
    exceed it, and every refusal is a token refusal."""
    urls = await gateways(nursery, redis_topology, tmp_path, 3)
    used: dict[str, list[int]] = {}
    refused: dict[str, list[str]] = {}

    async def new_key(client: httpx2.AsyncClient, tokens: int) -> tuple[str, str]:
        r = await client.post(
            urls[0] + "/admin/v1/keys", json={"tenant": "t", "tier": "pro"}, headers=ADMIN
        )
        kid, key = r.json()["key_id"], r.json()["key"]
        quota = {"requests": 1000, "tokens": tokens}
        r = await client.put(f"{urls[0]}/admin/v1/keys/{kid}/quota", json=quota, headers=ADMIN)
        assert r.status_code == 200, r.text
        return kid, key

    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(DEADLINE_S):
            _, probe_key = await new_key(client, 1_000_000)
            await trio.sleep(0.6)  # the registry's cache time
            probe = await chat(client, urls[0], probe_key)
            assert probe.status_code == 200, probe.text
            remaining = int(probe.headers["x-ratelimit-remaining-tokens"])
            cost = 1_000_000 - remaining  # what one request reserves
            assert probe.json()["usage"]["total_tokens"] <= cost
            limit = 3 * cost
            keys: dict[str, str] = {}
            while len(shards_of(request, list(keys))) < SHARDS and len(keys) < 30:
                kid, key = await new_key(client, limit)
                keys[kid] = key
                if "[cluster]" not in request.node.name and len(keys) >= 4:
                    break
            await trio.sleep(0.6)

            async def call(key: str, url: str) -> None:
                r = await chat(client, url, key)
                if r.status_code == 200:
                    used.setdefault(key, []).append(r.json()["usage"]["total_tokens"])
                else:
                    assert r.status_code == 429, r.text
                    refused.setdefault(key, []).append(r.json()["error"]["type"])

            async with trio.open_nursery() as calls:
                for key in keys.values():
                    for i in range(8):
                        calls.start_soon(call, key, urls[i % 3])
            metrics = (await client.get(urls[0] + "/metrics")).text
    assert all(len(used.get(key, [])) >= 3 for key in keys.values()), used
    assert all(sum(tokens) <= limit for tokens in used.values()), (limit, used)
    assert refused and all(set(types) == {"tokens"} for types in refused.values()), refused
    assert "scheduler_redis_errors_total 0.0" in metrics


async def test_a_plain_url_to_a_cluster_node_follows_the_cluster(
    nursery: trio.Nursery, redis_cluster: RedisClusterTopology, tmp_path: Path
) -> None:
    """`redis://` at one node of a cluster: MOVED is routing, so keys on every shard are
    served, the breaker stays closed and no Redis error is counted."""
    url = f"redis://127.0.0.1:{redis_cluster.nodes[0].port}/0"
    (a,) = await gateways(nursery, url, tmp_path, 1)
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(DEADLINE_S):
            codes = []
            for _ in range(9):  # keys made here land on every shard in 9 tries, p > 0.97
                r = await client.post(
                    a + "/admin/v1/keys", json={"tenant": "t", "tier": "pro"}, headers=ADMIN
                )
                assert r.status_code == 201
                codes.append((await chat(client, a, r.json()["key"])).status_code)
            metrics = (await client.get(a + "/metrics")).text
            ready = await client.get(a + "/readyz")
    assert codes == [200] * 9
    assert "scheduler_redis_errors_total 0.0" in metrics
    assert ready.status_code == 200


async def test_every_topology_client_runs_scripts_and_per_node_pipelines(
    redis_topology: str,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_redis(redis_topology) as redis:
            async with redis.pipeline(transaction=False) as pipe:
                replies = [pipe.set(f"t:{{{i}}}", str(i)) for i in range(20)]
            assert all([await r for r in replies])
            assert await redis.eval("return redis.call('GET', KEYS[1])", keys=["t:{7}"]) == b"7"


async def test_scripts_go_on_the_pipeliners_own_connection_off_a_cluster(
    redis_topology: str,
) -> None:
    """One server and a Sentinel's master: one write and one read per batch of scripts, on
    the pipeliner's connection; a Redis Cluster's go through coredis (its routing)."""
    get = "return redis.call('GET', KEYS[1])"
    with trio.fail_after(DEADLINE_S):
        async with open_pipelined(redis_topology) as (redis, pipeliner):
            await redis.set("own:{7}", "7")
            script = redis.register_script(get)
            await redis.script_load(get)  # on a cluster, on every node
            replies = await pipeliner.execute_each([lambda pipe: pipe.get("own:{7}")] * 2) + [
                await pipeliner.evalsha(script, ["own:{7}"], [])
            ]
    assert replies == [b"7"] * 3
    assert pipeliner.commands == 3
    assert pipeliner.own_commands == (0 if "cluster" in redis_topology else 1)


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("redis+cluster://127.0.0.1:7000,127.0.0.1:x/", "port"),
        ("redis+cluster://127.0.0.1:7000/0", "database 0"),
        ("redis+sentinel://127.0.0.1:26379/", "service_name"),
        ("redis+sentinel://127.0.0.1:26379/svc/zero", "database must be a number"),
        ("redis://h1:7000,h2:7001/0", "redis+cluster://"),
        ("redis+cluster://:7000/", "a host is required"),
    ],
)
def test_bad_topology_urls_are_refused_naming_the_field(url: str, field: str) -> None:
    with pytest.raises(
        ConfigError, match=r"^SCHEDULER_REDIS_URL \(--redis-url\): .*" + re.escape(field)
    ):
        load_settings(None, env={"SCHEDULER_REDIS_URL": url})


def test_topology_urls_are_understood() -> None:
    cluster = parse_redis_url("redis+cluster://127.0.0.1:7000,127.0.0.1:7001/")
    assert (cluster.mode, cluster.hosts) == ("cluster", (("127.0.0.1", 7000), ("127.0.0.1", 7001)))
    sentinel = parse_redis_url("rediss+sentinel://127.0.0.1:26379,127.0.0.1:26380/svc/2")
    assert (sentinel.mode, sentinel.tls, sentinel.service_name, sentinel.db) == (
        "sentinel",
        True,
        "svc",
        2,
    )
    env = {"SCHEDULER_REDIS_URL": "redis+sentinel://127.0.0.1:26379/svc"}
    env["SCHEDULER_REDIS_PASSWORD"] = "pw"
    settings = load_settings(None, env=env)
    assert settings.redis_secrets.password == "pw" and "pw" not in repr(settings)


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterTopology]:
    """A cluster of this test's own, for tests that stop a node."""
    with RedisClusterTopology(masters=3) as cluster:
        yield cluster


async def test_a_hung_shard_holds_up_only_its_own_keys(own_cluster: RedisClusterTopology) -> None:
    """One batch of the request-path pipeliner spans every node; with one master paused, the
    other nodes' commands are answered at once and only the paused node's calls time out."""
    kids = [f"k{i}" for i in range(30)]
    slots = [int(cli(own_cluster.nodes[0].port, "CLUSTER", "KEYSLOT", kid)) for kid in kids]
    owners = [own_cluster.slot_owner(slot) for slot in slots]
    hung = own_cluster.nodes[0]
    assert hung.port in owners and len(set(owners)) == SHARDS
    spec = QuotaSpec("gcra", Quota(100, 60.0))
    outcomes: dict[str, str] = {}
    with trio.fail_after(DEADLINE_S):
        async with open_pipelined(own_cluster.url) as (redis, pipeliner):
            store = RedisQuotaStore(redis, prefix="hung", pipeliner=pipeliner)
            await store.load_scripts()
            for kid in kids:  # every node's connection open, scripts known
                await store.take(kid, requests=spec, tokens=None, token_cost=0)

            async def take(kid: str) -> None:
                started_at = trio.current_time()
                try:
                    await store.take(kid, requests=spec, tokens=None, token_cost=0, timeout_s=0.3)
                    outcomes[kid] = f"answered in {trio.current_time() - started_at:.1f} s"
                except QuotaStoreUnavailable as exc:  # the pipeliner's round trip ran out
                    slow = isinstance(exc.__cause__, trio.TooSlowError)
                    outcomes[kid] = "timed out" if slow else repr(exc)

            hung.pause()
            try:
                async with trio.open_nursery() as nursery:
                    for kid in kids:
                        nursery.start_soon(take, kid)
            finally:
                hung.resume()
    expected = {
        kid: "timed out" if owner == hung.port else "answered in 0.0 s"
        for kid, owner in zip(kids, owners, strict=True)
    }
    assert outcomes == expected


async def test_an_idle_gateway_pings_each_primary_on_connections_it_keeps(
    nursery: trio.Nursery, redis_cluster: RedisClusterTopology, tmp_path: Path
) -> None:
    """The health ping (every 0.5 s, each primary) reuses its connections: an idle gateway
    opens none on a cluster's masters once it runs (it opened one per master per ping: 15 in
    the 2.6 s below)."""
    (url,) = await gateways(nursery, redis_cluster.url, tmp_path, 1)
    masters = redis_cluster.master_ports()

    def received() -> int:  # redis-cli's own connection to each master counts too
        stats = [cli(port, "INFO", "stats") for port in masters]
        return sum(int(re.findall(r"total_connections_received:(\d+)", s)[0]) for s in stats)

    async with httpx2.AsyncClient(timeout=10) as client:
        assert (await client.get(url + "/readyz")).status_code == 200
        await trio.sleep(1.0)  # running: its first pings and their connections are made
        before = received()
        await trio.sleep(2.6)  # five pings of every master
        opened = received() - before - len(masters)
    assert opened <= 1, f"{opened} connections in 2.6 s from an idle gateway"
