"""Quotas hold exactly across replicas: three gateway processes, one Redis, one demo backend.

Three `scheduler serve` processes share the session's Redis and one demo backend process. Two
keys, one on a sliding-window-log tier (10 requests per 15 s) and one on a GCRA tier (10 per
15 s, burst 5), are hammered for 20 s by 60 clients each, spread over the three replicas.
Whatever replica a request lands on, no 15-second window may hold more admissions than the
quota allows: 10 for the log, 10 + 5 for the GCRA (its bucket can be full at the window's start).
(The window's length changes nothing of what is tested; 15 s keeps the test at ~20 s.)

Admission happens in Redis somewhere between a client's send and its receive, so a request
counts in a window only if both its send and its receive lie inside it: the check can never
fail because of the clients' clock, and with answers in milliseconds it loses nothing.

A replica's first burst on a Redis that has never run the quota scripts (a new or restarted
server) must be decided by Redis too, not by the fail-open limiter.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx2
import trio

from backends.redis.embedded import EmbeddedRedis, free_port
from scheduler.service.config import load_settings
from scheduler.service.serve import with_demo_url
from tests.conftest import start_demo, start_gateway

SCHEDULER = str(Path(sys.executable).parent / "scheduler")
REPLICAS = 3
CLIENTS_PER_KEY = 60
LOAD_S = 20.0  # more than one window, so windows that straddle two are checked too
PERIOD_S = 15.0  # the quota's window: any length tests the same sharing
LIMIT = 10
BURST = 5
CHAT = {"model": "demo-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
CONFIG = """
[server]
replicas = {replicas}

[tiers.log]
weight = 1
max_wait_s = 10
max_depth = 1000
[tiers.log.quota]
algorithm = "sliding_log"
period_s = {period}
requests = {limit}

[tiers.gcra]
weight = 1
max_wait_s = 10
max_depth = 1000
[tiers.gcra.quota]
algorithm = "gcra"
period_s = {period}
requests = {limit}
request_burst = {burst}

[[keys]]
key = "{log_key}"
tenant = "log-tenant"
tier = "log"
[[keys]]
key = "{gcra_key}"
tenant = "gcra-tenant"
tier = "gcra"

[models.demo-small]
backends = ["{demo}"]
"""


@dataclass
class Tally:
    """What one key's clients saw."""

    admitted: list[tuple[float, float, bool]] = field(default_factory=list)  # sent, received, local
    refused: int = 0
    refused_without_retry_after: int = 0
    local_decisions: list[tuple[float, int]] = field(default_factory=list)  # (sent_at, status)
    other: dict[int, int] = field(default_factory=dict)  # status (0: no answer) -> count
    unverified: int = 0  # 503 + Retry-After: the quota could not be checked in time

    def max_in_window(self, period_s: float, *, redis_only: bool = False) -> int:
        """The most admissions certainly inside one closed window of `period_s` (only those
        Redis decided, with `redis_only`)."""
        admitted = [(s, r) for s, r, local in self.admitted if not (redis_only and local)]
        best = 0
        for start_at, _ in admitted:
            inside = sum(1 for s, r in admitted if s >= start_at and r <= start_at + period_s)
            best = max(best, inside)
        return best


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}


@contextmanager
def child(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, its stderr in `log`, stopped with SIGINT (then killed) on the way out."""
    with log.open("wb") as stderr:
        process = subprocess.Popen(args, env=child_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def wait_answering(
    client: httpx2.AsyncClient, url: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    with trio.fail_after(60):
        while True:
            if process.poll() is not None:  # say why: a start-up failure is otherwise silent
                tail = log.read_text(errors="replace")[-2000:]
                raise AssertionError(f"{url}: the process exited ({process.returncode}):\n{tail}")
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            await trio.sleep(0.1)


async def hammer(
    client: httpx2.AsyncClient, url: str, key: str, tally: Tally, deadline_at: float
) -> None:
    """Post until the deadline; after a 429 wait min(Retry-After, 1 s) so the load stays bounded."""
    auth = {"authorization": f"Bearer {key}"}
    while trio.current_time() < deadline_at:
        sent_at = trio.current_time()
        response = None
        with trio.move_on_after(10), suppress(httpx2.TransportError):
            response = await client.post(url, json=CHAT, headers=auth)
        received_at = trio.current_time()
        if response is None:
            tally.other[0] = tally.other.get(0, 0) + 1
            continue
        local = response.headers.get("x-ratelimit-source") == "local"
        if local:
            tally.local_decisions.append((sent_at, response.status_code))
        if response.status_code == 200:
            tally.admitted.append((sent_at, received_at, local))
        elif response.status_code == 429:
            tally.refused += 1
            retry_after = response.headers.get("retry-after")
            if retry_after is None:
                tally.refused_without_retry_after += 1
                retry_after = "1"
            await trio.sleep(min(float(retry_after), 1.0))
        elif response.status_code == 503 and response.headers.get("retry-after"):
            # a quota check that Redis did not answer in time (our loop under this load):
            # refused for now, as the caller's "retry shortly", never admitted on a guess
            tally.unverified += 1
            await trio.sleep(min(float(response.headers["retry-after"]), 1.0))
        else:
            status = response.status_code
            tally.other[status] = tally.other.get(status, 0) + 1
            await trio.sleep(0.1)


async def test_quotas_hold_across_three_replicas(redis_url: str, tmp_path: Path) -> None:
    demo_port = free_port()
    ports = [free_port() for _ in range(REPLICAS)]
    log_key, gcra_key = f"sk-log-{uuid.uuid4().hex}", f"sk-gcra-{uuid.uuid4().hex}"
    config = tmp_path / "replicas.toml"
    config.write_text(
        CONFIG.format(
            replicas=REPLICAS,
            period=PERIOD_S,
            limit=LIMIT,
            burst=BURST,
            log_key=log_key,
            gcra_key=gcra_key,
            demo=f"http://127.0.0.1:{demo_port}",
        )
    )
    demo_args = [sys.executable, "-m", "backends.demo.server", "--port", str(demo_port)]
    demo_args += ["--model", "demo-small", "--decode-base-s", "0.001"]
    tallies = {"log": Tally(), "gcra": Tally()}
    with ExitStack() as stack:
        demo_log = tmp_path / "demo.log"
        demo = stack.enter_context(child(demo_args, demo_log))
        serve = [SCHEDULER, "serve", "--config", str(config), "--redis-url", redis_url]
        stderrs = [tmp_path / f"gateway-{port}.log" for port in ports]
        gateways = [
            stack.enter_context(child([*serve, "--port", str(port)], stderr))
            for port, stderr in zip(ports, stderrs, strict=True)
        ]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        limits = httpx2.Limits(max_connections=2 * CLIENTS_PER_KEY, max_keepalive_connections=None)
        async with httpx2.AsyncClient(timeout=10, limits=limits) as client:
            await wait_answering(client, f"http://127.0.0.1:{demo_port}/health", demo, demo_log)
            for url, process, stderr in zip(urls, gateways, stderrs, strict=True):
                await wait_answering(client, url + "/readyz", process, stderr)
            started_at = trio.current_time()
            deadline_at = started_at + LOAD_S
            with trio.fail_after(LOAD_S + 30):
                async with trio.open_nursery() as nursery:
                    for i in range(CLIENTS_PER_KEY):
                        url = urls[i % REPLICAS] + "/v1/chat/completions"
                        nursery.start_soon(
                            hammer, client, url, log_key, tallies["log"], deadline_at
                        )
                        nursery.start_soon(
                            hammer, client, url, gcra_key, tallies["gcra"], deadline_at
                        )
        for process in gateways:
            assert process.poll() is None, "a gateway died under load"

    log, gcra = tallies["log"], tallies["gcra"]
    report = {
        name: {
            "admitted": len(t.admitted),
            "max_in_window": t.max_in_window(PERIOD_S),
            "max_in_window_by_redis": t.max_in_window(PERIOD_S, redis_only=True),
            "refused": t.refused,
            "local_decisions": len(t.local_decisions),
            "local_admitted": sum(1 for _, _, local in t.admitted if local),
            "local_at_s": sorted({round(at - started_at) for at, _ in t.local_decisions}),
            "other": t.other,
            "unverified": t.unverified,
        }
        for name, t in tallies.items()
    }
    print("replicas:", report)
    for t in (log, gcra):
        assert not t.other, report  # no 5xx but a 503 with Retry-After, no unanswered request
        assert t.unverified <= 0.01 * (t.refused + len(t.admitted)), report
        assert t.refused >= 500 and t.refused_without_retry_after == 0, report
    # the shared store is exact across replicas ...
    assert log.max_in_window(PERIOD_S, redis_only=True) <= LIMIT, report
    assert gcra.max_in_window(PERIOD_S, redis_only=True) <= LIMIT + BURST, report
    # ... and so is what the clients get, Redis being up all along
    assert log.max_in_window(PERIOD_S) <= LIMIT, report
    assert gcra.max_in_window(PERIOD_S) <= LIMIT + BURST, report
    # and the quotas were used, not just refused: a full first window for each key
    assert len(log.admitted) >= LIMIT, report
    assert len(gcra.admitted) >= BURST, report


COLD = """
[tiers.log]
weight = 1
max_wait_s = 10
max_depth = 1000
[tiers.log.quota]
algorithm = "sliding_log"
period_s = 60
requests = {limit}

[[keys]]
key = "{key}"
tenant = "cold-tenant"
tier = "log"

[models.demo-small]
backends = ["demo"]
"""


async def test_a_cold_replicas_first_burst_is_decided_by_redis(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # A Redis that has never seen the quota scripts (a new server, or one just restarted) and
    # a burst of first requests: every one of them must still be decided by Redis, so exactly
    # the quota is admitted, and none by a replica's fail-open limiter.
    key = f"sk-cold-{uuid.uuid4().hex}"
    config = tmp_path / "cold.toml"
    config.write_text(COLD.format(limit=LIMIT, key=key))
    with EmbeddedRedis() as redis:
        demo = await start_demo(nursery)
        settings = load_settings(config, env={}, overrides={"port": 0})
        settings = replace(with_demo_url(settings, demo), redis_url=redis.url)
        gateway = await start_gateway(nursery, settings)
        answers: list[tuple[int, str | None]] = []

        async def first_request(client: httpx2.AsyncClient) -> None:
            r = await client.post(
                gateway + "/v1/chat/completions",
                json=CHAT,
                headers={"authorization": f"Bearer {key}"},
            )
            answers.append((r.status_code, r.headers.get("x-ratelimit-source")))

        gc.collect()
        gc.freeze()  # no collection of pytest's heap stalls this process's loop meanwhile
        try:
            limits = httpx2.Limits(max_connections=4 * LIMIT)
            async with httpx2.AsyncClient(timeout=10, limits=limits) as client:
                with trio.fail_after(30):
                    while (await client.get(gateway + "/readyz")).status_code != 200:
                        await trio.sleep(0.05)
                    async with trio.open_nursery() as burst:
                        for _ in range(4 * LIMIT):
                            burst.start_soon(first_request, client)
        finally:
            gc.unfreeze()
    statuses = [status for status, _ in answers]
    local = [status for status, source in answers if source == "local"]
    assert not local, f"{len(local)} of {len(answers)} decided locally: {local}"
    assert statuses.count(200) == LIMIT, statuses
    assert statuses.count(429) == 3 * LIMIT, statuses
