"""Which Redis: one server, a Redis Cluster, or a Sentinel-managed master, chosen by the URL.

Why one URL: the gateway already takes `[redis] url` and `SCHEDULER_REDIS_URL`; a topology is
another scheme of the same setting, so switching is one line and nothing else moves.

    redis://[user:password@]host[:port][/db]             one server (rediss:// for TLS)
    unix:///path/to/redis.sock                           one server on a socket
    redis+cluster://host:port[,host:port...]/           Redis Cluster seed nodes (rediss+cluster)
    redis+sentinel://host:port[,host:port...]/service[/db]   Sentinel (rediss+sentinel)

A password and a CA file come from the environment (`RedisSecrets`), never from the config
file: `SCHEDULER_REDIS_USERNAME`, `SCHEDULER_REDIS_PASSWORD`, `SCHEDULER_REDIS_CA_FILE`. For a
Sentinel deployment the password is the data nodes'; the sentinels themselves are asked
without one unless `SCHEDULER_REDIS_SENTINEL_PASSWORD` is set.

`open_redis` is the one place where the gateway builds a coredis client: coredis's own
`RedisCluster` (it follows MOVED/ASK and the slot map itself) and `Sentinel.primary_for` (it
asks the sentinels where the master is, again after a failover). A `redis://` URL that turns
out to name a Redis Cluster node is opened as a cluster seeded by it: MOVED and ASK are routing,
never failures.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import coredis
import coredis.exceptions
import trio
from coredis._utils import hash_slot
from coredis.connection import TCPLocation

PROBE_TIMEOUT_S = 1.0  # asking a redis:// server whether it is a cluster node, at start-up
Mode = Literal["single", "cluster", "sentinel"]
_SCHEMES: dict[str, tuple[Mode, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}


@dataclass(frozen=True, slots=True)
class RedisSecrets:
    """Credentials and TLS trust from the environment, for every topology."""

    username: str = ""
    password: str = field(default="", repr=False)
    sentinel_password: str = field(default="", repr=False)
    ca_file: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RedisSecrets:
        return cls(
            username=env.get("SCHEDULER_REDIS_USERNAME", ""),
            password=env.get("SCHEDULER_REDIS_PASSWORD", ""),
            sentinel_password=env.get("SCHEDULER_REDIS_SENTINEL_PASSWORD", ""),
            ca_file=env.get("SCHEDULER_REDIS_CA_FILE", ""),
        )


@dataclass(frozen=True, slots=True)
class RedisTopology:
    """A parsed Redis URL: `mode`, the hosts (seeds or sentinels), and for Sentinel the
    service name and database."""

    mode: Mode
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    tls: bool = False
    service_name: str = ""
    db: int = 0


def parse_redis_url(url: str) -> RedisTopology:
    """The topology `url` names; ValueError saying what is wrong (the caller names the field)."""
    scheme = urlsplit(url).scheme
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        raise ValueError(f"expected one of {known}, got scheme {scheme!r}")
    mode, tls = _SCHEMES[scheme]
    if scheme == "unix":
        if not urlsplit(url).path:
            raise ValueError("a unix:// URL needs a socket path")
        return RedisTopology("single", url)
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    hosts = tuple(_host(part, 6379 if mode != "sentinel" else 26379) for part in netloc.split(","))
    path = [p for p in urlsplit(url).path.split("/") if p]
    if mode == "single":
        if len(hosts) != 1:
            raise ValueError(
                "expected one host (host:port), got several: use redis+cluster:// for a "
                "Redis Cluster or redis+sentinel:// for Sentinel"
            )
        _db(path[0] if path else "0")
        return RedisTopology("single", url, hosts, tls)
    if mode == "cluster":
        if path:
            raise ValueError("a Redis Cluster has only database 0: no path after the hosts")
        return RedisTopology("cluster", url, hosts, tls)
    if not path or len(path) > 2:
        raise ValueError("expected redis+sentinel://host:port[,host:port...]/service_name[/db]")
    return RedisTopology("sentinel", url, hosts, tls, unquote(path[0]), _db(path[1:] or ["0"]))


def _host(part: str, default_port: int) -> tuple[str, int]:
    host, colon, port = part.rpartition(":") if part.count(":") == 1 else (part, "", "")
    if not colon:
        host, port = part, str(default_port)
    if not host:
        raise ValueError(f"a host is required, got {part!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"the port must be a number from 1 to 65535, got {part!r}")
    return host, int(port)


def _db(text: str | list[str]) -> int:
    value = text[0] if isinstance(text, list) else text
    if not value.isdigit():
        raise ValueError(f"the database must be a number, got {value!r}")
    return int(value)


def _tls_context(secrets: RedisSecrets) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=secrets.ca_file or None)
    return context


def _auth(secrets: RedisSecrets) -> dict[str, Any]:
    auth: dict[str, Any] = {}
    if secrets.username:
        auth["username"] = secrets.username
    if secrets.password:
        auth["password"] = secrets.password
    return auth


CLUSTER_ATTEMPTS = (
    2  # a command's tries after a redirect: ASK (then ASKING) or MOVED, then the answer
)


@asynccontextmanager
async def open_redis(
    url: str, secrets: RedisSecrets | None = None
) -> AsyncIterator[coredis.Redis[bytes]]:
    """A connected coredis client for `url`'s topology, entered and left by this one task.

    Typed as `coredis.Redis` for the callers: `RedisCluster` offers the same commands,
    scripts and (per node) pipelines."""
    topology = parse_redis_url(url)
    secrets = secrets or RedisSecrets()
    tls: dict[str, Any] = {"ssl_context": _tls_context(secrets)} if topology.tls else {}
    if topology.mode == "single" and not await _is_cluster_node(url, secrets, tls):
        async with coredis.Redis.from_url(url, **tls, **_auth(secrets)) as redis:
            yield redis
    elif topology.mode in ("single", "cluster"):
        nodes = [TCPLocation(host, port) for host, port in topology.hosts]
        cluster: coredis.RedisCluster[bytes] = coredis.RedisCluster(
            startup_nodes=nodes, ssl=topology.tls, **tls, **_auth(secrets)
        )
        cluster.MAX_RETRIES = CLUSTER_ATTEMPTS
        async with cluster:
            yield cluster  # type: ignore[misc]
    else:
        async with _sentinel_primary(topology, secrets, tls) as primary:
            yield primary


async def _is_cluster_node(url: str, secrets: RedisSecrets, tls: dict[str, Any]) -> bool:
    """Whether a `redis://` URL names a Redis Cluster node. Then the cluster client is used
    with it as the seed: a plain client would meet MOVED for two thirds of the keys of a
    3-master cluster and take that routing for failures. A server that cannot be asked now
    (down at start-up) is taken as what the URL says."""
    if url.startswith("unix:"):
        return False
    enabled = False
    try:
        with trio.move_on_after(PROBE_TIMEOUT_S):
            async with coredis.Redis.from_url(url, **tls, **_auth(secrets)) as probe:
                info: Any = await probe.info("cluster")
                enabled = bool(int(info.get("cluster_enabled", 0)))
    except* (coredis.exceptions.RedisError, OSError):  # raised inside the client's nursery
        pass
    return enabled


@asynccontextmanager
async def _sentinel_primary(
    topology: RedisTopology, secrets: RedisSecrets, tls: dict[str, Any]
) -> AsyncIterator[coredis.Redis[bytes]]:
    sentinel_options: dict[str, Any] = dict(tls)
    if secrets.sentinel_password:
        sentinel_options["password"] = secrets.sentinel_password
    sentinel: coredis.Sentinel[bytes] = coredis.Sentinel(
        [TCPLocation(host, port) for host, port in topology.hosts],
        sentinel_kwargs=sentinel_options,
    )
    async with sentinel:
        primary: Any = sentinel.primary_for(
            topology.service_name, db=topology.db, **tls, **_auth(secrets)
        )
        async with primary:
            yield primary


def shard_of(redis: coredis.Redis[Any] | None, tag: str) -> str:
    """The name of the node serving hash tag `tag`'s slot, as the cluster client's slot map
    has it now ("" off a cluster, or when the map has no node for it): a breaker's scope."""
    if not isinstance(redis, coredis.RedisCluster):
        return ""
    try:
        slot = hash_slot(tag.encode())
        return str(redis.connection_pool.cluster_layout.node_for_slot(slot).name)
    except coredis.exceptions.RedisError:
        return ""


def shards(redis: coredis.Redis[Any] | None) -> set[str] | None:
    """The names of a cluster's primaries as its client's slot map has them now (None off a
    cluster): the breaker scopes in use."""
    if not isinstance(redis, coredis.RedisCluster):
        return None
    return {str(node.name) for node in redis.connection_pool.cluster_layout.primaries}
