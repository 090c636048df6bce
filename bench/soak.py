"""A soak run: many distinct keys, short quota periods, and a watch on every resource.

Why: per-key state kept anywhere (process memory, a Redis key without a TTL, a metric label)
passes every short test and fills a machine in a week. This run starts, each as its own
process on loopback, an embedded Redis, the demo backend with zero decode time and the
gateway (`scheduler serve`) with quotas whose periods are seconds, so TTLs pass during the
run. It registers `--keys` distinct keys straight into Redis (the admin API's layout,
pipelined) and then:

1. warm-up: authenticates every key once (`GET /v1/models`), so the key registry's cache
   (per-key memory by design: the Redis-outage fallback, capped at 100,000 entries) is full;
2. soak: chat completions (every 4th streamed) pass after pass over the keys, every 8th key
   twice in a row (its quota refuses one), at a bounded rate for a bounded time, sampling
   the gateway's RSS (/proc), Redis `DBSIZE` and `used_memory`, and the `/metrics` series.

Then it checks:

- RSS flat once a whole chat pass is done (every key then went through every per-key
  structure: the registry's cache, the quota guard's per-key state): the mean of the last third
  of those samples within `max(rss_slack_mb, rss_slack_ratio)` of the first third's; before
  that, the growth per key new to the soak under `rss_per_key_limit_b`, give or take one
  `rss_step_b` (RSS moves in steps: a 3,000-key stretch of ~2,000 visits grows ~2 MB);
- no Redis key without a TTL but the registered keys (`<prefix>:tenancy:{id}:meta` and
  `<prefix>:tenancy:keys`); transient keys bounded (3 per request answered within the
  longest TTL), and DBSIZE back to exactly the registered keys once the traffic stops and
  the TTLs pass;
- at most `max_refused_share` of the soak's answers neither 200 nor 429;
- `/metrics`: no label value outside what it showed before the traffic (configured tiers,
  routes, models, fixed enums) but a request outcome, no series appearing after `settle_s`
  but a first-seen outcome's, no tenant or key id anywhere.

At 100,000 keys a whole chat pass is 112,500 requests: 4 to 7 minutes at the 270-550
requests/s of a shared 2-core VM, so the default 150 s judges the growth per new key only;
add `--seconds 600` for the flat-RSS verdict too.

    python bench/soak.py [--keys 100000] [--seconds 150] [--rate 800] [--passes 3]

The last lines are a summary table (for bench/RESULTS.md); the exit status is 1 when a check
fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import coredis
import httpx2
import trio

from backends.http.client import BackendError, BackendLimits, HttpClient
from backends.redis.embedded import EmbeddedRedis, free_port
from scheduler.service.config import key_id
from scheduler.service.metrics import OUTCOMES

SECRET = "soak-key-secret"
PREFIX = "soak"  # the deployment's Redis prefix (`[redis] prefix`)
TIERS = ("free", "pro", "enterprise")
TENANT_PREFIX = "soak-tenant-"
KEYS_PER_REQUEST = 3  # request quota state, token quota state, cache entry
MB = 1024 * 1024
WARM_UP_CONCURRENCY = 8  # more only queues in the gateway, whose lookups then time out
LABEL = re.compile(r'(\w+)="([^"]*)"')
Log = Callable[[str], None]

CONFIG = """
keys = []

[redis]
prefix = "{prefix}"

[server]
default_max_tokens = 8
drain_timeout_s = 2.0

[tiers.free]
weight = 1
max_wait_s = 10
max_depth = 100000
quota = {{ algorithm = "sliding_log", period_s = {free}, requests = 1, tokens = 2000 }}

[tiers.pro]
weight = 3
max_wait_s = 10
max_depth = 100000
quota = {{ algorithm = "gcra", period_s = {pro}, requests = 1, tokens = 4000 }}

[tiers.enterprise]
weight = 8
max_wait_s = 10
max_depth = 100000
quota = {{ algorithm = "sliding_counter", period_s = {enterprise}, requests = 1, tokens = 8000 }}

[models.demo-small]
backends = ["{demo}"]
cache_fresh_s = {fresh}
cache_stale_s = {stale}

[controller]  # a limit above the client's concurrency: nothing queues, outcomes stay few
initial_limit = 256
min_limit = 256
max_limit = 1024
"""


@dataclass(frozen=True, slots=True)
class SoakPlan:
    """What to send and how to judge it. Periods are the free, pro and enterprise quotas'."""

    keys: int = 100_000
    passes: int = 3  # chat passes over the keys, at most
    double_every: int = 8  # every 8th key is sent twice in a row: its quota refuses one
    rate_per_s: float = 800.0
    seconds: float = 150.0  # the soak stops at the latest here (the warm-up too)
    concurrency: int = 32
    sample_every_s: float = 2.0
    settle_s: float = 10.0  # samples of the soak's first seconds are not judged
    periods_s: tuple[float, float, float] = (2.0, 3.0, 4.0)
    cache_fresh_s: float = 1.0
    cache_stale_s: float = 2.0
    rss_slack_mb: float = 4.0
    rss_slack_ratio: float = 0.05
    rss_per_key_limit_b: int = 1024  # growth per key the soak had not seen yet
    rss_step_b: int = 1 << 20  # RSS grows by whole pymalloc arenas (1 MiB): one is slack
    max_refused_share: float = 0.05  # answers neither 200 nor 429 (401, 503, none)

    @property
    def max_ttl_s(self) -> float:
        """The longest TTL written: a sliding counter keeps two periods."""
        free, pro, enterprise = self.periods_s
        return max(free, pro, 2 * enterprise, self.cache_fresh_s + self.cache_stale_s)

    @property
    def deadline_s(self) -> float:
        return 2 * self.seconds + self.max_ttl_s + 120.0


DEFAULT = SoakPlan()


@dataclass(frozen=True, slots=True)
class Sample:
    at_s: float  # since the soak started
    done: int  # requests answered so far
    rss_kb: int
    dbsize: int
    used_memory: int
    series: frozenset[str]  # every series in /metrics: its name and labels


@dataclass(frozen=True, slots=True)
class TtlCheck:
    """Every key in Redis when the traffic stopped, by kind; `untimed` lacked a TTL."""

    registry: int
    quota: int
    cache: int
    other: int
    unprefixed: int  # keys outside the deployment's prefix
    untimed: tuple[str, ...]


@dataclass(slots=True)
class Tally:
    done: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    unanswered: list[int] = field(default_factory=list)  # requests not answered 200


# -- processes -------------------------------------------------------------------------------


@contextmanager
def process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    """Run `args` with its output in `log`; yields its pid; SIGTERM (then SIGKILL) on exit."""
    with log.open("wb") as out:
        child = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            yield child.pid
        finally:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def start_demo(stack: ExitStack, tmp: Path) -> str:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "backends.demo.server",
        "--port",
        str(port),
        "--model",
        "demo-small",
    ]
    args += ["--decode-base-s", "0", "--decode-per-seq-s", "0", "--max-batch", "100000"]
    args += ["--max-waiting", "100000", "--kv-capacity-tokens", str(10**9)]
    stack.enter_context(process(args, tmp / "demo.log"))
    _wait_port(port, tmp / "demo.log")
    return f"http://127.0.0.1:{port}"


def start_gateway(
    stack: ExitStack, plan: SoakPlan, redis_url: str, demo_url: str, tmp: Path
) -> tuple[int, int]:
    """`scheduler serve` with the soak's config; returns (pid, port)."""
    free, pro, enterprise = plan.periods_s
    config = tmp / "soak.toml"
    fresh, stale = plan.cache_fresh_s, plan.cache_stale_s
    config.write_text(
        CONFIG.format(
            prefix=PREFIX,
            free=free,
            pro=pro,
            enterprise=enterprise,
            demo=demo_url,
            fresh=fresh,
            stale=stale,
        )
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCHEDULER_", "PROMETHEUS_"))}
    env.update(SCHEDULER_KEY_SECRET=SECRET, OTEL_TRACES_EXPORTER="none")
    scheduler = str(Path(sys.executable).parent / "scheduler")
    args = [scheduler, "serve", "--config", str(config), "--port", str(port)]
    pid = stack.enter_context(process([*args, "--redis-url", redis_url], tmp / "gw.log", env))
    _wait_port(port, tmp / "gw.log")
    return pid, port


def _wait_port(port: int, log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing on {port}; log:\n{log.read_text()[-2000:]}") from None
            time.sleep(0.05)


def rss_kb(pid: int) -> int:
    """VmRSS of `pid` in kB, from /proc (no psutil)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- Redis -----------------------------------------------------------------------------------


async def register_keys(redis: coredis.Redis[bytes], count: int, *, batch: int = 5000) -> list[str]:
    """`count` keys in the admin API's layout (a meta hash each, and the id set); the clear
    keys are returned, in order; key i is in tier TIERS[i % 3]."""
    clear = [f"sk-soak-{i:07d}" for i in range(count)]
    ids = [key_id(k, SECRET.encode()) for k in clear]
    now = str(time.time())
    for start in range(0, count, batch):
        chunk = ids[start : start + batch]
        async with redis.pipeline(transaction=False) as pipe:
            for i, kid in enumerate(chunk, start):
                meta = {"tenant": f"{TENANT_PREFIX}{i}", "tier": TIERS[i % 3], "bypass": "0"}
                meta |= {"revoked": "0", "created": now}
                pipe.hset(f"{PREFIX}:tenancy:{{{kid}}}:meta", meta)
            pipe.sadd(f"{PREFIX}:tenancy:keys", chunk)
    return clear


def _kind(key: bytes) -> str:
    """registry (the registered keys), quota, cache or other, with or without the prefix."""
    text = key.decode().removeprefix(PREFIX + ":")
    if text == "tenancy:keys" or (text.startswith("tenancy:{") and text.endswith("}:meta")):
        return "registry"
    role = text.split(":", 1)[0]
    return role if role in ("quota", "cache") else "other"


async def check_ttls(redis: coredis.Redis[bytes]) -> TtlCheck:
    """Scan every key; each one but the registered keys must carry a TTL."""
    kinds: Counter[str] = Counter()
    untimed: list[str] = []
    cursor: int | None = None
    while cursor != 0:
        cursor, keys = await redis.scan(cursor or 0, count=5000)
        kinds.update(_kind(k) for k in keys)
        kinds["unprefixed"] += sum(not k.startswith(PREFIX.encode() + b":") for k in keys)
        transient = [k for k in keys if _kind(k) != "registry"]
        async with redis.pipeline(transaction=False) as pipe:
            ttls = [pipe.pttl(k) for k in transient]
        untimed += [k.decode() for k, ttl in zip(transient, ttls, strict=True) if await ttl == -1]
    return TtlCheck(
        kinds["registry"],
        kinds["quota"],
        kinds["cache"],
        kinds["other"],
        kinds["unprefixed"],
        tuple(untimed),
    )


# -- the load --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""


async def send(http: HttpClient, port: int, call: Call) -> int:
    """The answer's status, its body read and dropped; 0 when no answer came in 30 s."""
    url = f"http://127.0.0.1:{port}{call.target}"
    try:
        status, _ = await http.request(
            call.method, url, headers=dict(call.headers), body=call.body, timeout_s=30.0
        )
    except BackendError:
        return 0
    return status


class Calls:
    """The requests of the two phases, built on demand (100,000 keys stay cheap)."""

    def __init__(self, plan: SoakPlan, port: int, keys: list[str]) -> None:
        self.keys = keys
        self.host = ("host", f"127.0.0.1:{port}")
        self.order = self.visit_order(plan)
        self.bodies = [
            json.dumps(
                {
                    "model": "demo-small",
                    "messages": [{"role": "user", "content": f"soak {i % 5}"}],
                    "max_tokens": 8,
                    "stream": i >= 5,
                }
            ).encode()
            for i in range(10)  # five prompts, whole and streamed
        ]

    @staticmethod
    def visit_order(plan: SoakPlan) -> list[int]:
        """One chat pass: every key once, in a stride coprime with their number (spread out),
        every `double_every`-th visit twice in a row."""
        n = plan.keys
        step = next(s for s in itertools.count(int(n * 0.618) + 1) if math.gcd(s, n) == 1)
        return [k * step % n for k in range(n) for _ in range(1 + (k % plan.double_every == 0))]

    def models_of(self, keys: list[int]) -> Callable[[int], Call]:
        """Warm-up: request j authenticates key `keys[j]`."""
        return lambda j: Call(
            "GET", "/v1/models", [self.host, ("authorization", f"Bearer {self.keys[keys[j]]}")]
        )

    def chat(self, j: int) -> Call:
        """Soak: request j of the passes; every 4th streams."""
        body = self.bodies[j % 5 + (5 if j % 4 == 3 else 0)]
        headers = [
            self.host,
            ("authorization", f"Bearer {self.keys[self.order[j % len(self.order)]]}"),
        ]
        headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
        return Call("POST", "/v1/chat/completions", headers, body)


async def drive(
    port: int, make: Callable[[int], Call], count: int, plan: SoakPlan, tally: Tally
) -> None:
    """Send requests 0..count-1, request j due at `j / rate_per_s` from now, at most
    `concurrency` at once; none is sent after `seconds`."""
    counter = itertools.count()
    start = trio.current_time()
    end_at = start + plan.seconds

    async def worker() -> None:
        while (j := next(counter)) < count and trio.current_time() < end_at:
            due = start + j / plan.rate_per_s
            if due >= end_at:
                break
            await trio.sleep_until(due)
            status = await send(http, port, make(j))
            tally.statuses[status] += 1
            tally.done += 1
            if status != 200:
                tally.unanswered.append(j)

    # one keep-alive connection per worker, reopened after the server closes it
    http = HttpClient(BackendLimits(max_connections=plan.concurrency, keepalive_s=60.0))
    try:
        with trio.move_on_at(end_at + 30):
            async with trio.open_nursery() as nursery:
                for _ in range(plan.concurrency):
                    nursery.start_soon(worker)
    finally:
        http.close()


# -- sampling --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Probe:
    pid: int
    url: str
    redis: coredis.Redis[bytes]
    http: httpx2.AsyncClient

    async def sample(self, at_s: float, done: int) -> Sample:
        info = await self.redis.info("memory")
        return Sample(
            at_s,
            done,
            rss_kb(self.pid),
            await self.redis.dbsize(),
            int(str(info["used_memory"])),
            series(await self.metrics()),
        )

    async def metrics(self) -> str:
        return (await self.http.get(self.url + "/metrics")).text

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        with trio.fail_after(timeout_s):
            while (await self.http.get(self.url + "/readyz")).status_code != 200:
                await trio.sleep(0.1)


def series(exposition: str) -> frozenset[str]:
    """The series of a Prometheus exposition: each sample line without its value."""
    lines = exposition.splitlines()
    return frozenset(line.rsplit(" ", 1)[0] for line in lines if line and line[0] != "#")


def label_values(names: Iterable[str]) -> dict[str, set[str]]:
    values: dict[str, set[str]] = defaultdict(set)
    for name in names:
        for label, value in LABEL.findall(name):
            values[label].add(value)
    return values


def outcomes(exposition: str) -> dict[str, int]:
    """`scheduler_requests_total` summed by outcome."""
    totals: Counter[str] = Counter()
    for line in exposition.splitlines():
        if line.startswith("scheduler_requests_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            totals[outcome] += int(float(line.rsplit(" ", 1)[1]))
    return dict(totals)


async def warm_up(plan: SoakPlan, port: int, calls: Calls, *, rounds: int = 3) -> Tally:
    """Authenticate every key once, as fast as the gateway answers, within `seconds`; a key
    not answered 200 (a registry lookup that timed out answers 401) is tried again, up to
    `rounds` times."""
    end_at = trio.current_time() + plan.seconds
    total, todo = Tally(), list(range(plan.keys))
    for _ in range(rounds):
        left_s = end_at - trio.current_time()
        unpaced = SoakPlan(rate_per_s=math.inf, seconds=left_s, concurrency=WARM_UP_CONCURRENCY)
        tally = Tally()
        await drive(port, calls.models_of(todo), len(todo), unpaced, tally)
        total.done += tally.done
        total.statuses.update(tally.statuses)
        todo = [todo[j] for j in tally.unanswered]
        if not todo:
            break
    total.unanswered = todo
    return total


async def soak(
    plan: SoakPlan, probe: Probe, port: int, calls: Calls, log: Log
) -> tuple[Tally, list[Sample]]:
    """The chat passes, sampled every `sample_every_s`, and a last sample after them."""
    tally, samples = Tally(), []
    start = trio.current_time()

    async def sample_forever() -> None:
        while True:
            samples.append(await probe.sample(trio.current_time() - start, tally.done))
            log(_progress(samples[-1]))
            await trio.sleep(plan.sample_every_s)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_forever)
        await drive(port, calls.chat, len(calls.order) * plan.passes, plan, tally)
        nursery.cancel_scope.cancel()
    samples.append(await probe.sample(trio.current_time() - start, tally.done))
    return tally, samples


async def drain(plan: SoakPlan, probe: Probe, expected: int, log: Log) -> list[Sample]:
    """Sample until DBSIZE is back to `expected` (the registered keys) or the TTLs are long
    past."""
    samples: list[Sample] = []
    start = trio.current_time()
    with trio.move_on_after(plan.max_ttl_s + 15.0):
        while not samples or samples[-1].dbsize != expected:
            await trio.sleep(0.5)
            samples.append(await probe.sample(trio.current_time() - start, 0))
            log(_progress(samples[-1], "drain "))
    return samples


def _progress(s: Sample, prefix: str = "") -> str:
    return (
        f"{prefix}t={s.at_s:6.1f}s done={s.done:>8,} rss={s.rss_kb / 1024:6.1f} MB "
        f"dbsize={s.dbsize:>8,} used_memory={s.used_memory / MB:6.1f} MB series={len(s.series)}"
    )


# -- the run and its report ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SoakReport:
    plan: SoakPlan
    register_s: float
    baseline: Sample  # keys registered, before any traffic
    warmup: Tally
    warmed: Sample  # after the warm-up
    samples: tuple[Sample, ...]  # during the soak
    drained: tuple[Sample, ...]  # after it
    tally: Tally
    ttl: TtlCheck
    leaked_labels: tuple[str, ...]  # tenants or key ids found in /metrics
    outcomes: dict[str, int]  # the gateway's own count of answers, by outcome

    @property
    def registered(self) -> int:
        """Redis keys that are the registered keys: a meta hash each, and the id set."""
        return self.plan.keys + 1

    @property
    def pass_length(self) -> int:
        """Requests in one chat pass (`Calls.visit_order`)."""
        return self.plan.keys + -(-self.plan.keys // self.plan.double_every)

    @property
    def settled(self) -> tuple[Sample, ...]:
        """The soak's samples after `settle_s`."""
        return tuple(s for s in self.samples if s.at_s >= self.plan.settle_s)

    @property
    def judged(self) -> tuple[Sample, ...]:
        """The settled samples once a whole chat pass is done: every key has then been
        through every per-key structure (the registry's cache, the quota guard's per-key state)."""
        return tuple(s for s in self.settled if s.done >= self.pass_length)

    def rss_mb(self) -> tuple[float, float, float]:
        """Mean RSS of the first and of the last third of the judged samples, and the limit
        on their difference."""
        third = max(1, len(self.judged) // 3)
        first = statistics.fmean(s.rss_kb for s in self.judged[:third]) / 1024
        last = statistics.fmean(s.rss_kb for s in self.judged[-third:]) / 1024
        return first, last, max(self.plan.rss_slack_mb, self.plan.rss_slack_ratio * first)

    def new_key_growth(self) -> tuple[float, int]:
        """Before the first chat pass ends each visit is a key the soak had not seen: RSS
        growth over the settled samples of that stretch, in bytes, and the visits in it."""
        early = [s for s in self.settled if s.done <= self.pass_length]
        if len(early) < 2 or early[-1].done - early[0].done < 1000:
            return 0.0, 0  # too few to tell a key's cost from the process warming up
        return (early[-1].rss_kb - early[0].rss_kb) * 1024, early[-1].done - early[0].done

    def rss_per_new_key(self) -> float:
        """RSS growth per key new to the soak, in bytes (0 when too few samples tell)."""
        growth, visits = self.new_key_growth()
        return growth / visits if visits else 0.0

    def new_keys_overgrew(self) -> bool:
        """The first pass grew more than `rss_per_key_limit_b` per new key and one RSS step."""
        growth, visits = self.new_key_growth()
        return growth > self.plan.rss_per_key_limit_b * visits + self.plan.rss_step_b

    def transient_bound(self) -> int:
        """Redis keys the requests may leave: 3 per request answered within the longest TTL
        (plus a second of expiry lag and a sample interval) before a sample, and in flight."""
        span = self.plan.max_ttl_s + 1.0 + self.plan.sample_every_s
        worst = 0
        for s in self.samples:
            before = [p.done for p in self.samples if p.at_s <= s.at_s - span]
            worst = max(worst, s.done - (before[-1] if before else 0))
        return KEYS_PER_REQUEST * (worst + self.plan.concurrency)

    def refused_share(self) -> float:
        """The share of the soak's requests answered neither 200 nor 429: a key known to
        Redis refused (401), a quota not verified in time (503), no answer."""
        statuses = self.tally.statuses
        return 1 - (statuses[200] + statuses[429]) / max(1, self.tally.done)

    def transient_peak(self) -> int:
        return max(s.dbsize for s in self.samples) - self.registered

    def foreign_labels(self) -> list[str]:
        """Label values /metrics did not show before the traffic, other than an outcome."""
        known = label_values(self.baseline.series)
        seen = label_values(set().union(*(s.series for s in (*self.samples, *self.drained))))
        return sorted(
            f'{label}="{value}"'
            for label, values in seen.items()
            for value in values - known[label]
            if not (label == "outcome" and value in OUTCOMES)
        )

    def new_series(self) -> list[str]:
        """Series that appeared after the first settled sample."""
        if not self.settled:
            return []
        return sorted(set().union(*(s.series for s in self.settled)) - self.settled[0].series)

    def failures(self) -> list[str]:
        problems = []
        if len(self.judged) >= 6:
            first, last, limit = self.rss_mb()
            if last - first > limit:
                problems.append(f"RSS grew {last - first:.1f} MB after a pass (limit {limit:.1f})")
        elif len(self.settled) < 6:
            problems.append(f"only {len(self.settled)} samples after settle_s: raise --seconds")
        if self.new_keys_overgrew():
            problems.append(f"RSS grew {self.rss_per_new_key():,.0f} bytes per new key")
        if self.ttl.untimed:
            problems.append(f"{len(self.ttl.untimed)} keys without TTL: {self.ttl.untimed[:5]}")
        if self.ttl.registry != self.registered or self.ttl.other:
            problems.append(f"unexpected keys: {self.ttl}")
        if not (self.ttl.quota and self.ttl.cache and self.tally.statuses[200]):
            problems.append("the quota and cache paths were not exercised")
        if self.refused_share() > self.plan.max_refused_share:
            problems.append(f"{self.refused_share():.0%} of the soak answered neither 200 nor 429")
        if self.transient_peak() > self.transient_bound():
            problems.append(f"{self.transient_peak()} transient keys > {self.transient_bound()}")
        if not self.drained or self.drained[-1].dbsize != self.registered:
            problems.append(f"DBSIZE did not fall back to {self.registered} after the traffic")
        if self.foreign_labels() or self.leaked_labels:
            problems.append(f"unbounded labels: {self.foreign_labels()[:5]} {self.leaked_labels}")
        if any(not s.startswith("scheduler_requests_") for s in self.new_series()):
            problems.append(f"series appeared in the soak: {self.new_series()[:5]}")
        return problems

    def summary(self) -> list[str]:
        """The report as a Markdown table, the verdict last."""
        problems = self.failures()
        rows = [*self._traffic_rows(), *self._resource_rows()]
        rows.append(("verdict", "PASS" if not problems else "FAIL: " + "; ".join(problems)))
        return ["| soak | result |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]

    def _traffic_rows(self) -> list[tuple[str, str]]:
        plan, last = self.plan, self.samples[-1]
        rate = last.done / last.at_s if last.at_s else 0.0
        per_key = last.done / plan.keys
        return [
            ("keys", f"{plan.keys:,} registered in {self.register_s:.1f} s"),
            (
                "warm-up (GET /v1/models)",
                f"{self.warmup.done:,} ({_statuses(self.warmup)}); "
                f"{len(self.warmup.unanswered)} keys never authenticated",
            ),
            (
                "soak (chat, 1 in 4 streamed)",
                f"{last.done:,} in {last.at_s:.0f} s ({rate:,.0f}/s, {per_key:.1f} per key); "
                f"{_statuses(self.tally)}",
            ),
            (
                "gateway outcomes",
                ", ".join(f"{k}: {v:,}" for k, v in sorted(self.outcomes.items())),
            ),
        ]

    def _resource_rows(self) -> list[tuple[str, str]]:
        last = self.samples[-1]
        end = self.drained[-1] if self.drained else last
        first, final, limit = self.rss_mb() if self.judged else (0.0, 0.0, 0.0)
        per_key = (self.warmed.rss_kb - self.baseline.rss_kb) * 1024 / self.plan.keys
        back = f"in {end.at_s:.1f} s" if end.dbsize == self.registered else "never"
        transient = self.ttl.quota + self.ttl.cache + self.ttl.other
        rss = [self.baseline, self.warmed, last, end]
        seen = set().union(*(s.series for s in self.samples))
        return [
            (
                "gateway RSS: registered / warmed / soaked / drained",
                _mbs(s.rss_kb * 1024 for s in rss),
            ),
            ("RSS per key (warm-up)", f"{per_key:,.0f} bytes"),
            (
                "RSS per key new to the soak (first chat pass)",
                f"{self.rss_per_new_key():,.0f} bytes over {self.new_key_growth()[1]:,} visits "
                f"(limit {self.plan.rss_per_key_limit_b:,} a key plus one RSS step of "
                f"{self.plan.rss_step_b:,})",
            ),
            (
                "RSS after the first chat pass",
                f"first third {first:.1f} MB, last third {final:.1f} MB "
                f"({final - first:+.1f} MB; limit {limit:.1f} MB)"
                if self.judged
                else f"not judged: the soak ended before a pass of {self.pass_length:,} requests",
            ),
            (
                "Redis DBSIZE",
                f"{self.registered:,} registered; transient peak {self.transient_peak():,} "
                f"(bound {self.transient_bound():,}); {end.dbsize:,} after the soak (back {back})",
            ),
            (
                "Redis used_memory: registered / peak / drained",
                _mbs(
                    [
                        self.baseline.used_memory,
                        max(s.used_memory for s in self.samples),
                        end.used_memory,
                    ]
                ),
            ),
            (
                "keys without TTL",
                f"{len(self.ttl.untimed)} of {transient:,} transient "
                f"(quota {self.ttl.quota:,}, cache {self.ttl.cache:,}, other {self.ttl.other}); "
                f"outside the prefix {PREFIX!r}: {self.ttl.unprefixed:,}",
            ),
            (
                "/metrics series",
                f"{len(self.baseline.series)} before traffic, {len(self.samples[0].series)} at the "
                f"soak's start, {len(seen)} seen in it; new after settle_s: "
                f"{len(self.new_series())}; foreign label values: {len(self.foreign_labels())}; "
                f"tenant or key id: {'yes' if self.leaked_labels else 'no'}",
            ),
        ]


def _mbs(values: Iterable[int]) -> str:
    return " / ".join(f"{v / MB:.1f} MB" for v in values)


def _statuses(tally: Tally) -> str:
    return ", ".join(f"{k or 'no answer'}: {v:,}" for k, v in sorted(tally.statuses.items()))


def run_soak(plan: SoakPlan, *, log: Log = lambda _: None) -> SoakReport:
    """Start Redis, the demo backend and the gateway, soak them, stop them; the report."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        redis = stack.enter_context(EmbeddedRedis())
        demo_url = start_demo(stack, tmp)
        pid, port = start_gateway(stack, plan, redis.url, demo_url, tmp)
        return trio.run(_run, plan, redis.url, pid, port, log)


async def _run(plan: SoakPlan, redis_url: str, pid: int, port: int, log: Log) -> SoakReport:
    with trio.fail_after(plan.deadline_s):
        async with (
            coredis.Redis.from_url(redis_url) as redis,
            httpx2.AsyncClient(timeout=10) as http,
        ):
            probe = Probe(pid, f"http://127.0.0.1:{port}", redis, http)
            await probe.wait_ready()
            started = time.monotonic()
            keys = await register_keys(redis, plan.keys)
            register_s = time.monotonic() - started
            baseline = await probe.sample(0.0, 0)
            log(f"registered {plan.keys:,} keys in {register_s:.1f} s; {_progress(baseline)}")
            calls = Calls(plan, port, keys)
            warmup = await warm_up(plan, port, calls)
            warmed = await probe.sample(0.0, 0)
            log(f"warm-up: {_statuses(warmup)}; {_progress(warmed)}")
            tally, samples = await soak(plan, probe, port, calls, log)
            ttl = await check_ttls(redis)
            drained = await drain(plan, probe, plan.keys + 1, log)
            text = await probe.metrics()
    secrets = (TENANT_PREFIX, key_id(keys[0], SECRET.encode()), keys[0])
    leaked = tuple(s for s in secrets if s in text)
    return SoakReport(
        plan,
        register_s,
        baseline,
        warmup,
        warmed,
        tuple(samples),
        tuple(drained),
        tally,
        ttl,
        leaked,
        outcomes(text),
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=DEFAULT.keys)
    parser.add_argument("--seconds", type=float, default=DEFAULT.seconds)
    parser.add_argument("--rate", type=float, default=DEFAULT.rate_per_s)
    parser.add_argument("--passes", type=int, default=DEFAULT.passes)
    parser.add_argument("--concurrency", type=int, default=DEFAULT.concurrency)
    args = parser.parse_args()
    plan = SoakPlan(
        keys=args.keys,
        passes=args.passes,
        rate_per_s=args.rate,
        seconds=args.seconds,
        concurrency=args.concurrency,
    )
    report = run_soak(plan, log=lambda line: print(line, flush=True))
    print("\n".join(report.summary()))
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
