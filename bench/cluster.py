"""Gateway + quota on a 3-master Redis Cluster against one Redis server, in one run.

Starts on loopback: the demo backend with zero decode time, one plain `redis-server`, a Redis
Cluster of three masters (from the same binary, as the tests do), and two gateways
(`scheduler serve`), one on each Redis. Then a closed loop of `--clients` connections on the
key whose every request runs the Redis quota script, `--rounds` times on each gateway in
turn (the machine's noise falls on both), for `--seconds` each. The last line is the
throughput ratio cluster / single (goal: at least 0.9). Run as `python -m bench.cluster`.

For sizing, each round also prints the Redis CPU each admission cost (`INFO cpu` of the
server, or summed over the cluster's masters, before and after): the quota script, its
settlement and the cache write of one request. One Redis core serves about 1 / that.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import trio

from backends.redis.embedded import free_port
from bench.load import Load
from bench.rig import body, gateway_toml, start
from tests.support.redis_topologies import RedisClusterTopology, RedisNode, cli

QUOTA_KEY = "sk-bench-quota"


def gateway(stack: ExitStack, tmp: Path, demo: str, redis_url: str) -> str:
    port = free_port()
    config = tmp / f"gateway-{port}.toml"
    config.write_text(gateway_toml({"demo-small": demo}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    env["SCHEDULER_REDIS_URL"] = redis_url
    scheduler = str(Path(sys.executable).parent / "scheduler")
    start(stack, [scheduler, "serve", "--config", str(config), "--port", str(port)], port, env)
    return f"http://127.0.0.1:{port}/v1/chat/completions"


def redis_cpu_s(ports: list[int]) -> float:
    """CPU seconds the Redis servers on `ports` have used so far (user plus system)."""
    total = 0.0
    for port in ports:
        fields = dict(
            line.split(":", 1) for line in cli(port, "INFO", "cpu").splitlines() if ":" in line
        )
        total += float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])
    return total


def measure(clients: int, seconds: float, rounds: int) -> dict[str, list[float]]:
    """Requests per second of each gateway, per round."""
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        demo_port = free_port()
        zero = ["--decode-base-s", "0", "--decode-per-seq-s", "0", "--max-batch", "100000"]
        zero += ["--max-waiting", "100000", "--kv-capacity-tokens", str(10**9)]
        args = [sys.executable, "-m", "backends.demo.server", "--port", str(demo_port), *zero]
        start(stack, args, demo_port)
        demo = f"http://127.0.0.1:{demo_port}"
        single = RedisNode(free_port(), Path(tmp) / "single", ("--appendonly", "no")).start()
        stack.callback(single.stop)
        cluster = stack.enter_context(RedisClusterTopology(masters=3))
        loads = {
            name: Load(gateway(stack, Path(tmp), demo, url), QUOTA_KEY, body("demo-small"), {})
            for name, url in (
                ("single", f"redis://127.0.0.1:{single.port}/0"),
                ("cluster", cluster.url),
            )
        }
        servers = {"single": [single.port], "cluster": cluster.master_ports()}
        rps: dict[str, list[float]] = {name: [] for name in loads}
        for load in loads.values():
            trio.run(load.closed, 8, 1.0)  # warm-up
        for _ in range(rounds):
            for name, load in loads.items():
                cpu_before_s = redis_cpu_s(servers[name])
                tally = trio.run(load.closed, clients, seconds)
                answered = len(tally.latencies)
                redis_us = 1e6 * (redis_cpu_s(servers[name]) - cpu_before_s) / max(1, answered)
                rps[name].append(answered / seconds)
                non_2xx = dict(tally.failures) or 0
                print(
                    f"{name}: {answered / seconds:.0f} req/s, non-2xx {non_2xx}, "
                    f"Redis CPU {redis_us:.0f} us per request"
                )
    return rps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rps = measure(args.clients, args.seconds, args.rounds)
    single, cluster = sum(rps["single"]), sum(rps["cluster"])
    print(
        f"gateway+quota: single Redis {single / args.rounds:.0f} req/s, 3-master cluster "
        f"{cluster / args.rounds:.0f} req/s"
    )
    print(f"cluster/single throughput ratio: {cluster / single:.2f} (goal: at least 0.9)")


if __name__ == "__main__":
    main()
