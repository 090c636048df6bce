"""Redis goes away under load and comes back: the gateway keeps answering by each tier's fail mode.

A private redis-server on a fixed port (not the session's: it is killed, or paused with SIGSTOP,
and restarted on the same port), one in-process gateway, the in-process demo backend, and a
steady load of clients on two tiers: `open` (a local limiter decides while Redis is out) and
`closed` (503 with Retry-After while Redis is out). We check that no request gets a 500, that
none takes much longer than before the outage (the Redis calls are bounded by a 50 ms timeout
and a breaker), that `/readyz` says Redis is down, and that Redis decides again within 2 s of
its return.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import signal
import statistics
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx2
import trio

from backends.redis.embedded import EmbeddedRedis, free_port
from scheduler.service.config import load_settings
from scheduler.service.quota import DOWN_AFTER_S, AdaptiveTimeout
from scheduler.service.serve import with_demo_url
from tests.conftest import start_demo, start_gateway

CONFIG = """
[tiers.open]
weight = 1
max_wait_s = 5
max_depth = 1000
fail_mode = "open"
[tiers.open.quota]
algorithm = "gcra"
period_s = 60
requests = 100000
[tiers.closed]
weight = 1
max_wait_s = 5
max_depth = 1000
fail_mode = "closed"
[tiers.closed.quota]
algorithm = "sliding_log"
period_s = 60
requests = 100000

[[keys]]
key = "{open}"
tenant = "open-tenant"
tier = "open"
[[keys]]
key = "{closed}"
tenant = "closed-tenant"
tier = "closed"

[models.demo-small]
backends = ["demo"]
"""
CHAT = {"model": "demo-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
CLIENTS_PER_TIER = 2
WARM_UP_S = 0.3
BEFORE_S = 1.5  # load before the outage (the latency baseline)
OUTAGE_S = 2.5
AFTER_S = 3.0  # load after Redis returns
RECOVERY_S = 2.0  # Redis decides again within this long of its return
LATENCY_MARGIN_S = 0.5
REQUEST_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class Answer:
    tier: str
    started_at: float
    ended_at: float
    status: int  # 0: no answer (a transport error or our timeout)
    source: str | None  # x-ratelimit-source
    limit: str | None  # x-ratelimit-limit-requests
    retry_after: str | None

    @property
    def took_s(self) -> float:
        return self.ended_at - self.started_at

    @property
    def by_redis(self) -> bool:
        return self.status == 200 and self.source is None and self.limit == "100000"


class Load:
    """Clients that post one request after another to `url`, recording every answer."""

    def __init__(self, url: str, keys: dict[str, str]) -> None:
        self.url = url
        self.keys = keys
        self.answers: list[Answer] = []

    async def client(self, client: httpx2.AsyncClient, tier: str) -> None:
        auth = {"authorization": f"Bearer {self.keys[tier]}"}
        while True:
            started_at = trio.current_time()
            status, headers = 0, httpx2.Headers()
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                try:
                    r = await client.post(self.url, json=CHAT, headers=auth)
                    status, headers = r.status_code, r.headers
                except httpx2.TransportError:
                    pass
            self.answers.append(
                Answer(
                    tier,
                    started_at,
                    trio.current_time(),
                    status,
                    headers.get("x-ratelimit-source"),
                    headers.get("x-ratelimit-limit-requests"),
                    headers.get("retry-after"),
                )
            )
            await trio.sleep(0.02)

    def between(self, tier: str, start_at: float, end_at: float) -> list[Answer]:
        """Answers to requests sent in [start_at, end_at) and answered by end_at."""
        return [
            a
            for a in self.answers
            if a.tier == tier and start_at <= a.started_at and a.ended_at <= end_at
        ]


async def readyz(client: httpx2.AsyncClient, gateway: str) -> tuple[int, bool]:
    r = await client.get(gateway + "/readyz")
    return r.status_code, bool(r.json()["checks"]["redis"]["ok"])


async def wait_ready(client: httpx2.AsyncClient, gateway: str, within_s: float) -> float:
    """Seconds until /readyz says ready (fails after `within_s`)."""
    started_at = trio.current_time()
    with trio.fail_after(within_s):
        while await readyz(client, gateway) != (200, True):
            await trio.sleep(0.05)
    return trio.current_time() - started_at


def summary(answers: list[Answer]) -> str:
    took = [a.took_s for a in answers]
    if not took:
        return "no answers"
    return f"n={len(took)} p50={statistics.median(took) * 1000:.0f}ms max={max(took) * 1000:.0f}ms"


class PrivateRedis:
    """The redis-server under test: one port, killed or paused and brought back on it."""

    def __init__(self) -> None:
        self.server = EmbeddedRedis(port=free_port()).start()
        self.url = self.server.url

    def kill(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        self.server = EmbeddedRedis(port=self.server.port).start()

    def pause(self) -> None:
        assert self.server.process is not None
        self.server.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.server.process is not None
        self.server.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        process = self.server.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        self.server.stop()


@dataclasses.dataclass(frozen=True)
class Phases:
    start_at: float
    down_at: float
    up_at: float
    end_at: float
    readyz_down: tuple[int, bool]
    ready_after_s: float
    fail_mode_decisions: dict[tuple[str, str], float]  # (tier, mode) -> count, from /metrics


async def run_outage(
    nursery: trio.Nursery,
    tmp_path: Path,
    redis: PrivateRedis,
    go_down: Callable[[], None],
    come_back: Callable[[], None],
    outage_s: float = 0.0,
) -> tuple[Load, Phases]:
    keys = {"open": f"sk-open-{uuid.uuid4().hex}", "closed": f"sk-closed-{uuid.uuid4().hex}"}
    path = tmp_path / "outage.toml"
    path.write_text(CONFIG.format(**keys))
    demo = await start_demo(nursery)
    settings = load_settings(path, env={}, overrides={"port": 0})
    settings = dataclasses.replace(with_demo_url(settings, demo), redis_url=redis.url)
    gateway = await start_gateway(nursery, settings)
    load = Load(gateway + "/v1/chat/completions", keys)
    # The whole test process (pytest's heap included) is one trio loop: a full garbage
    # collection stalls it for 60-80 ms, longer than the 50 ms Redis timeout, and a request
    # then fails over although Redis is fine. Frozen objects are not scanned again.
    gc.collect()
    gc.freeze()
    try:
        async with httpx2.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            outage_s = outage_s or OUTAGE_S
            with trio.fail_after(BEFORE_S + outage_s + AFTER_S + 20):
                phases = await drive(load, client, gateway, go_down, come_back, outage_s)
    finally:
        gc.unfreeze()
    return load, phases


async def drive(
    load: Load,
    client: httpx2.AsyncClient,
    gateway: str,
    go_down: Callable[[], None],
    come_back: Callable[[], None],
    outage_s: float,
) -> Phases:
    """Load, warm up, take Redis away for `outage_s`, bring it back, load a while longer."""
    await wait_ready(client, gateway, 5.0)
    async with trio.open_nursery() as clients:
        for tier in ("open", "closed"):
            for _ in range(CLIENTS_PER_TIER):
                clients.start_soon(load.client, client, tier)
        await trio.sleep(WARM_UP_S)
        start_at = trio.current_time()
        await trio.sleep(BEFORE_S)
        go_down()
        down_at = trio.current_time()
        await trio.sleep(0.3)
        readyz_down = await readyz(client, gateway)
        await trio.sleep(outage_s - 0.3)
        come_back()
        up_at = trio.current_time()
        ready_after_s = await wait_ready(client, gateway, RECOVERY_S)
        await trio.sleep(AFTER_S)
        end_at = trio.current_time()
        clients.cancel_scope.cancel()
    decisions = await fail_mode_decisions(client, gateway)
    return Phases(start_at, down_at, up_at, end_at, readyz_down, ready_after_s, decisions)


async def fail_mode_decisions(
    client: httpx2.AsyncClient, gateway: str
) -> dict[tuple[str, str], float]:
    """`scheduler_fail_mode_decisions_total` by (tier, mode), from the replica's /metrics."""
    counts = {}
    for line in (await client.get(gateway + "/metrics")).text.splitlines():
        if line.startswith("scheduler_fail_mode_decisions_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            counts[labels["tier"], labels["mode"]] = float(line.rsplit(" ", 1)[1])
    return counts


TIMEOUT_CEILING_S = AdaptiveTimeout(0.1).ceiling_s


def check_outage(load: Load, phases: Phases, slow_s: float = 0.0) -> str:
    """Assert the fail modes, the latency bound and the recovery; returns a summary.

    `slow_s`: for the first seconds of an outage in which Redis is silent rather than gone
    (paused, or calls in flight as it goes), the gateway cannot tell it from a slow Redis that
    may still apply the script, so an `open` tier answers 503 with Retry-After rather than
    admit twice; after that, its fail mode. The same holds while Redis comes back."""
    # Redis down is reported; the replica stays ready, since the open tier can still admit
    assert phases.readyz_down == (200, False), "/readyz must say Redis is down"
    assert phases.ready_after_s <= RECOVERY_S
    decisions = phases.fail_mode_decisions  # counted, and visible to the operator
    assert decisions.get(("open", "open"), 0) > 0 and decisions.get(("closed", "closed"), 0) > 0
    start_at, down_at, up_at, end_at = phases.start_at, phases.down_at, phases.up_at, phases.end_at
    everything = load.between("open", start_at, end_at) + load.between("closed", start_at, end_at)
    statuses = sorted({a.status for a in everything})
    assert set(statuses) <= {200, 503}, statuses  # no 500, no hang (0)
    grace_until = phases.down_at + slow_s

    def may_be_unverified(a: Answer) -> bool:  # Redis silent, or catching up on resuming
        # in flight as Redis went (sent a moment before it, answered after) counts as during
        return (phases.down_at < a.ended_at and a.started_at <= grace_until) or (
            slow_s > 0 and phases.up_at <= a.started_at <= phases.up_at + RECOVERY_S
        )

    unverified = [a for a in everything if a.status == 503 and a.tier == "open"]
    outside = [a for a in unverified if not may_be_unverified(a)]
    assert not outside, (phases.down_at, grace_until, phases.up_at, outside[:3])
    assert all(a.retry_after for a in everything if a.status == 503)
    reports = []
    for tier in ("open", "closed"):
        before = load.between(tier, start_at, down_at)
        during = load.between(tier, down_at, up_at)
        after = load.between(tier, up_at, end_at)
        report = f"{tier}: before {summary(before)}; during {summary(during)}"
        reports.append(report)
        assert len(before) >= 10 and len(during) >= 10, report
        assert all(a.by_redis for a in before), (report, [a for a in before if not a.by_redis])
        # while Redis is out: the tier's fail mode
        if tier == "open":
            failed_over = [a for a in during if a.started_at > grace_until]
            assert failed_over, report
            assert all(a.status == 200 and a.source == "local" for a in failed_over), report
        else:
            assert all(a.status == 503 for a in during), report
        # promptly: no request (those sent as Redis went included) much slower than before
        slowest_before = max(a.took_s for a in before)
        outage = [a for a in everything if a.tier == tier and a.ended_at > down_at]
        assert max(a.took_s for a in outage) < slowest_before + LATENCY_MARGIN_S, report
        # back: Redis decides every request sent more than RECOVERY_S after its return
        late = [a for a in after if not a.by_redis and a.started_at > up_at + RECOVERY_S]
        assert not late, (report, late[:3])
        assert any(a.by_redis for a in after), report
    return f"{'; '.join(reports)}; ready again after {phases.ready_after_s:.2f}s"


async def test_redis_killed_and_restarted_under_load(nursery: trio.Nursery, tmp_path: Path) -> None:
    redis = PrivateRedis()
    try:
        load, phases = await run_outage(
            nursery, tmp_path, redis, redis.kill, redis.restart, outage_s=DOWN_AFTER_S + 3.5
        )
    finally:
        redis.close()
    # calls in flight as Redis goes (and reconnects) may time out rather than be refused: the
    # gateway cannot tell that from silence, so the same grace as a pause applies
    print("killed:", check_outage(load, phases, slow_s=DOWN_AFTER_S + TIMEOUT_CEILING_S + 0.5))


async def test_redis_paused_and_resumed_under_load(nursery: trio.Nursery, tmp_path: Path) -> None:
    redis = PrivateRedis()
    try:
        load, phases = await run_outage(
            nursery, tmp_path, redis, redis.pause, redis.resume, outage_s=DOWN_AFTER_S + 3.5
        )
    finally:
        redis.close()
    # down = silent for DOWN_AFTER_S counted from the first failing call, which itself may
    # wait out a timeout of up to TIMEOUT_CEILING_S before it fails
    print("paused:", check_outage(load, phases, slow_s=DOWN_AFTER_S + TIMEOUT_CEILING_S + 0.5))
