"""Throughput and added latency of the gateway against a bare passthrough, in one run.

Starts, each as its own process on loopback: the demo backend with zero decode time, the
gateway in front of it (`scheduler serve`, embedded Redis), and `bench/passthrough.py` twice
(a bare quart-trio proxy of the same request: through httpx2, the goal's baseline, and
through the gateway's own HTTP client, which leaves only the gateway's own work as the
difference). Then, for each target:
1. closed loop: `--clients` connections send requests back to back for `--seconds`;
2. open loop at half of the passthrough's closed-loop rate, to compare p50 latency.
The load generator is the gateway's own HTTP client (`backends.http.client`), one keep-alive
connection per client, so that it is not the bottleneck.
Run as `python bench/gateway.py`; the last line is the throughput ratio. Every non-2xx answer
is counted per target and printed (the goal is none: a saturated gateway answers slower, it
does not refuse). `--only gateway+quota --clients 128 --seconds 10` runs one target's closed
loop alone (no open loop), e.g. to watch the quota path under saturation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import httpx2
import trio

from backends.http.client import BackendError, BackendLimits, HttpClient
from backends.redis.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps(
    {"model": "demo-small", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
).encode()
GATEWAY_TOML = """
[server]
default_max_tokens = 16
[tiers.enterprise]
weight = 8
max_wait_s = 30
max_depth = 100000
[tiers.pro]
weight = 3
max_wait_s = 30
max_depth = 100000
[tiers.free]
weight = 1
max_wait_s = 30
max_depth = 100000
[tiers.enterprise.quota]
algorithm = "gcra"
requests = 100000000
tokens = 1000000000
[[keys]]
key = "sk-bench"
tenant = "bench"
tier = "pro"
[[keys]]
key = "sk-bench-quota"
tenant = "bench-quota"
tier = "enterprise"
[models.demo-small]
backends = ["{demo}"]
[controller]
initial_limit = 1024
max_limit = 4096
"""


def start(stack: ExitStack, args: list[str], port: int, env: dict[str, str] | None = None) -> None:
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    def stop() -> None:
        process.terminate()
        process.wait(10)

    stack.callback(stop)
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx2.get(f"http://127.0.0.1:{port}/", timeout=1)
            return
        except httpx2.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args[:3]} did not start") from None
            time.sleep(0.1)


TARGETS = {  # name -> API key sent
    "passthrough": None,
    "passthrough-h11": None,
    "gateway": "sk-bench",
    "gateway+quota": "sk-bench-quota",
}
FAILURES: Counter[int] = Counter()  # non-2xx answers by status, in the current phase


def headers_for(key: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    return headers


async def call(http: HttpClient, url: str, headers: dict[str, str]) -> int:
    """One request's status, 0 when no answer came."""
    try:
        return (await http.request("POST", url, headers=headers, body=BODY, timeout_s=60.0))[0]
    except BackendError:
        return 0


def load_client(connections: int) -> HttpClient:
    return HttpClient(BackendLimits(max_connections=connections, keepalive_s=60.0))


async def closed_loop(port: int, key: str | None, clients: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    url, headers = f"http://127.0.0.1:{port}/v1/chat/completions", headers_for(key)
    end_at = trio.current_time() + seconds

    async def client(http: HttpClient) -> None:
        while trio.current_time() < end_at:
            started = trio.current_time()
            status = await call(http, url, headers)
            if not 200 <= status < 300:  # counted, not timed
                FAILURES[status] += 1
                continue
            latencies.append(trio.current_time() - started)

    http = load_client(clients)
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client, http)
    finally:
        http.close()
    return latencies


async def open_loop(port: int, key: str | None, rate: float, seconds: float) -> list[float]:
    latencies: list[float] = []
    url, headers = f"http://127.0.0.1:{port}/v1/chat/completions", headers_for(key)
    count = int(rate * seconds)
    http = load_client(max(1, count))  # a connection per request in flight, reused when idle

    async def one() -> None:
        started = trio.current_time()
        status = await call(http, url, headers)
        if not 200 <= status < 300:
            FAILURES[status] += 1
            return
        latencies.append(trio.current_time() - started)

    try:
        async with trio.open_nursery() as nursery:
            start_at = trio.current_time()
            for i in range(count):
                await trio.sleep_until(start_at + i / rate)
                nursery.start_soon(one)
    finally:
        http.close()
    return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def run_phase(
    phase: Callable[..., Awaitable[list[float]]], *args: object
) -> tuple[list[float], int, dict[int, int]]:
    """One trio run of `phase`: the latencies of its 2xx answers, and its non-2xx answers
    (their count, and by status)."""
    FAILURES.clear()
    latencies = trio.run(phase, *args)
    return latencies, sum(FAILURES.values()), dict(FAILURES)


def measure(clients: int, seconds: float, only: str | None = None) -> dict[str, dict[str, float]]:
    """Closed-loop throughput and latency of each target, then p50/p99 at half of the
    passthrough's throughput. Targets: the bare passthroughs (httpx2, h11), the gateway for
    a key with no quota, and the gateway for a key whose every request runs the Redis quota
    script. With `only`, that target's closed loop alone."""
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        demo_port, pass_port, h11_port, gw_port = (free_port() for _ in range(4))
        demo = f"http://127.0.0.1:{demo_port}"
        zero = ["--decode-base-s", "0", "--decode-per-seq-s", "0", "--max-batch", "100000"]
        zero += ["--max-waiting", "100000", "--kv-capacity-tokens", str(10**9)]
        start(
            stack,
            [sys.executable, "-m", "backends.demo.server", "--port", str(demo_port), *zero],
            demo_port,
        )
        passthrough = [sys.executable, str(ROOT / "bench" / "passthrough.py")]
        for port, client in ((pass_port, "httpx2"), (h11_port, "h11")):
            args = ["--port", str(port), "--upstream", demo, "--client", client]
            start(stack, [*passthrough, *args], port)
        config = Path(tmp) / "gateway.toml"
        config.write_text(GATEWAY_TOML.replace("{demo}", demo))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
        scheduler = str(Path(sys.executable).parent / "scheduler")
        serve = [scheduler, "serve", "--config", str(config), "--port", str(gw_port)]
        start(stack, serve, gw_port, env)
        ports = dict(zip(TARGETS, (pass_port, h11_port, gw_port, gw_port), strict=True))
        targets = {name: (ports[name], TARGETS[name]) for name in TARGETS}
        if only is not None:
            targets = {only: targets[only]}
        results: dict[str, dict[str, float]] = {}
        for name, (port, key) in targets.items():
            trio.run(closed_loop, port, key, 8, 1.0)  # warm-up
            lat, failed, by_status = run_phase(closed_loop, port, key, clients, seconds)
            results[name] = {"rps": len(lat) / seconds, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99)}
            results[name]["non_2xx"] = failed
            print(f"{name} closed loop, c={clients}: {len(lat)} 2xx, non-2xx {by_status or 0}")
        if only is not None:
            return results
        half = results["passthrough"]["rps"] / 2
        for name, (port, key) in targets.items():
            lat, failed, by_status = run_phase(open_loop, port, key, half, seconds)
            results[name]["half_rps"] = half
            results[name]["half_p50"] = pct(lat, 0.5)
            results[name]["half_p99"] = pct(lat, 0.99)
            results[name]["half_non_2xx"] = failed
            if by_status:
                print(f"{name} open loop: non-2xx {by_status}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only", choices=TARGETS, help="run this target's closed loop alone")
    args = parser.parse_args()
    results = measure(args.clients, args.seconds, args.only)
    if args.only is not None:
        r = results[args.only]
        print(
            f"{args.only}: {r['rps']:.0f} req/s, p50 {r['p50'] * 1e3:.2f} ms,"
            f" p99 {r['p99'] * 1e3:.2f} ms, non-2xx {r['non_2xx']:.0f} (goal: 0)"
        )
        return
    half = results["passthrough"]["half_rps"]
    head = f"{'target':<14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
    print(f"{head}   at {half:.0f} req/s: {'p50 ms':>7} {'p99 ms':>7}")
    for name, r in results.items():
        print(
            f"{name:<14} {r['rps']:>8.0f} {r['p50'] * 1e3:>8.2f} {r['p99'] * 1e3:>8.2f}"
            f"   {'':>14}{r['half_p50'] * 1e3:>7.2f} {r['half_p99'] * 1e3:>7.2f}"
        )
    base = results["passthrough"]
    for name in ("gateway", "gateway+quota"):
        added = (results[name]["half_p50"] - base["half_p50"]) * 1e3
        print(f"{name} adds {added:.2f} ms at p50 at half load (goal: under 1 ms)")
    for name, r in results.items():  # not counted as throughput; the goal is none
        print(f"{name} non-2xx: {r['non_2xx']:.0f} closed loop, {r['half_non_2xx']:.0f} open loop")
    for name in ("gateway+quota", "gateway"):
        ratio = results[name]["rps"] / results["passthrough-h11"]["rps"]
        print(f"{name}/passthrough-h11 throughput ratio: {ratio:.2f} (the gateway's own cost)")
    for name in ("gateway+quota", "gateway"):
        ratio = results[name]["rps"] / base["rps"]
        print(f"{name}/passthrough throughput ratio: {ratio:.2f} (goal: at least 0.80)")


if __name__ == "__main__":
    main()
