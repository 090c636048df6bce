"""A Redis Cluster shard that dies, with and without a replica to take over, under load:
only that shard's keys are affected (503 with Retry-After or the tier's fail mode, never
500), the other shards keep serving, and the gateway follows a promoted replica without a
restart; likewise a Sentinel-managed master. Each test has a topology of its own (it kills
a node)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import trio

from scheduler.service.config import load_settings
from scheduler.service.serve import with_demo_url
from tests.conftest import start_demo, start_gateway
from tests.service.test_admin import ADMIN, CONFIG, TOKEN, chat
from tests.support.redis_topologies import RedisClusterTopology, SentinelTopology, cli

DEADLINE_S = 40.0
CLOSED = CONFIG.replace("max_depth = 100", 'max_depth = 100\nfail_mode = "closed"')


@pytest.fixture
def cluster_with_replicas() -> Iterator[RedisClusterTopology]:
    with RedisClusterTopology(masters=3, replicas_per_master=1) as cluster:
        yield cluster


@pytest.fixture
def bare_cluster() -> Iterator[RedisClusterTopology]:
    with RedisClusterTopology(masters=3) as cluster:
        yield cluster


async def serve(
    nursery: trio.Nursery,
    cluster: RedisClusterTopology | SentinelTopology,
    tmp_path: Path,
    config: str,
) -> str:
    demo = await start_demo(nursery)
    path = tmp_path / "failover.toml"
    path.write_text(config.replace("{prefix}", f"fo-{uuid.uuid4().hex[:8]}"))
    settings = load_settings(path, env={"SCHEDULER_ADMIN_TOKEN": TOKEN}, overrides={"port": 0})
    settings = dataclasses.replace(with_demo_url(settings, demo), redis_url=cluster.url)
    return await start_gateway(nursery, settings)


async def keys_on_every_shard(
    client: httpx2.AsyncClient, url: str, cluster: RedisClusterTopology, per_shard: int
) -> dict[int, list[str]]:
    """Keys made through the admin API until each master serves `per_shard` of them."""
    by_shard: dict[int, list[str]] = {port: [] for port in cluster.master_ports()}
    while min(len(keys) for keys in by_shard.values()) < per_shard:
        r = await client.post(
            url + "/admin/v1/keys", json={"tenant": "t", "tier": "pro"}, headers=ADMIN
        )
        assert r.status_code == 201
        slot = int(cli(cluster.nodes[0].port, "CLUSTER", "KEYSLOT", r.json()["key_id"]))
        by_shard[cluster.slot_owner(slot)].append(r.json()["key"])
    await trio.sleep(0.6)  # the registry's cache time: every replica reads the new keys
    return by_shard


async def test_a_dead_shard_stops_only_its_own_keys(
    nursery: trio.Nursery, bare_cluster: RedisClusterTopology, tmp_path: Path
) -> None:
    """A master killed with no replica: its keys get 503 with Retry-After (the tier fails
    closed), never 500; the keys on the two live shards are all served (the shard's breaker
    opens, not everyone's) and the replica stays ready."""
    url = await serve(nursery, bare_cluster, tmp_path, CLOSED)
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(DEADLINE_S):
            by_shard = await keys_on_every_shard(client, url, bare_cluster, 2)
            for keys in by_shard.values():  # every key known and used once
                assert all([(await chat(client, url, key)).status_code == 200 for key in keys])
            dead = min(by_shard)
            bare_cluster.node_for_port(dead).kill()
            seen: dict[bool, list[tuple[int, bool]]] = {True: [], False: []}
            until = trio.current_time() + 2.0  # past the key cache's and the breaker's times
            while trio.current_time() < until:
                for port, keys in by_shard.items():
                    for key in keys:
                        r = await chat(client, url, key)
                        seen[port == dead].append((r.status_code, "retry-after" in r.headers))
            ready = await client.get(url + "/readyz")
    assert set(seen[False]) == {(200, False)}
    assert set(seen[True]) == {(503, True)}
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["redis"]["shards_down"] == 1


async def test_a_killed_master_fails_over_under_load(
    nursery: trio.Nursery, cluster_with_replicas: RedisClusterTopology, tmp_path: Path
) -> None:
    """3 masters + 3 replicas, one client per key calling without pause; a master is killed.
    Its keys get 503 with Retry-After until the replica is promoted, then 200 again through
    the same gateway; the other shards' keys are all 200. The over-admission (writes the dead
    master acknowledged but had not yet replicated) is measured from Redis's own count."""
    cluster = cluster_with_replicas
    config = CLOSED.replace("requests = 1000", "requests = 100000")
    url = await serve(nursery, cluster, tmp_path, config)
    log: dict[str, list[tuple[float, int, str]]] = {}
    stop = trio.Event()

    async def load(client: httpx2.AsyncClient, key: str) -> None:
        while not stop.is_set():
            sent_at = trio.current_time()
            r = await chat(client, url, key)
            remaining = r.headers.get("x-ratelimit-remaining-requests", "")
            if r.status_code == 503:
                remaining = "retry-after" if "retry-after" in r.headers else "none"
            log.setdefault(key, []).append((sent_at, r.status_code, remaining))

    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(DEADLINE_S):
            by_shard = await keys_on_every_shard(client, url, cluster, 2)
            dead = min(by_shard)
            async with trio.open_nursery() as clients:
                for keys in by_shard.values():
                    for key in keys:
                        clients.start_soon(load, client, key)
                await trio.sleep(0.5)
                cluster.node_for_port(dead).kill()
                killed_at = trio.current_time()
                healed_at = await healed(log, by_shard[dead], killed_at)
                await trio.sleep(0.5)
                stop.set()
            await trio.sleep(0.2)  # a dispatcher tick: the metrics mirror the breakers
            metrics = (await client.get(url + "/metrics")).text
    # the dead node's breaker is forgotten with the node: Redis is up again, all closed
    assert "scheduler_redis_up 1.0" in metrics and "scheduler_breaker_state 0.0" in metrics
    statuses = {key: {status for _, status, _ in entries} for key, entries in log.items()}
    for port, keys in by_shard.items():
        for key in keys:
            assert statuses[key] <= ({200, 503} if port == dead else {200}), statuses[key]
            assert all(rem == "retry-after" for _, s, rem in log[key] if s == 503)
    assert all(503 in statuses[key] for key in by_shard[dead])  # there was a failover
    over = [over_admitted(log[key]) for key in by_shard[dead]]
    print(f"failover: healed in {healed_at - killed_at:.1f} s, over-admitted {over}")
    assert healed_at - killed_at < 15.0
    assert all(n <= 3 for n in over), over


async def healed(
    log: dict[str, list[tuple[float, int, str]]], keys: list[str], after: float
) -> float:
    """When every key of the killed shard was admitted again after `after`."""
    while True:
        times = [
            next((t for t, s, _ in log.get(key, []) if t > after and s == 200), None)
            for key in keys
        ]
        if all(t is not None for t in times):
            return max(t for t in times if t is not None)
        await trio.sleep(0.05)


def over_admitted(entries: list[tuple[float, int, str]]) -> int:
    """How many more requests the gateway admitted than the promoted replica counts: the
    last reply's `remaining` is Redis's count; every 200 before it was an admission."""
    admitted = [rem for _, s, rem in entries if s == 200]
    return len(admitted) - (100000 - int(admitted[-1]))


async def test_a_killed_sentinel_master_fails_over_under_load(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Master + replica + 3 sentinels: the master is killed under load; requests get 503 with
    Retry-After (never 500) until the sentinels promote the replica, then 200 again through
    the same gateway, which asked the sentinels where the master is now."""
    with SentinelTopology() as sentinel:
        url = await serve(nursery, sentinel, tmp_path, CLOSED)
        outcomes: list[tuple[float, int, bool]] = []
        async with httpx2.AsyncClient(timeout=10) as client:
            with trio.fail_after(DEADLINE_S):
                r = await client.post(
                    url + "/admin/v1/keys", json={"tenant": "t", "tier": "pro"}, headers=ADMIN
                )
                key = r.json()["key"]
                assert (await chat(client, url, key)).status_code == 200
                old_master = sentinel.master_port()
                sentinel.master.kill()
                killed_at = trio.current_time()
                while not outcomes or outcomes[-1][1] != 200:
                    sent_at = trio.current_time()
                    r = await chat(client, url, key)
                    outcomes.append((sent_at, r.status_code, "retry-after" in r.headers))
                    await trio.sleep(0.02)
        healed_s = outcomes[-1][0] - killed_at
        print(f"sentinel failover: healed in {healed_s:.1f} s after {len(outcomes)} calls")
        assert {(s, ra) for _, s, ra in outcomes[:-1]} <= {(503, True)}
        assert len(outcomes) > 1 and sentinel.master_port() != old_master
        assert healed_s < 20.0
