"""A faulty backend under load: the gateway answers every request, with the right error.

gateway -> fault proxy (`tests.support.fault_proxy`) -> demo backend, all on loopback, with a
real Redis. For each fault a modest concurrent load is sent with one key that has a small
request quota, and every test checks the same contract:

- every request is answered, within its deadline (queue wait plus the request timeout);
- no 500, and no 5xx but 502 (the backend failed), 503 (no capacity, no backend) and 504
  (the backend did not answer in time); every error is OpenAI-shaped;
- every 429 and 503 carries Retry-After;
- the quota is kept exactly (DESIGN §2.6): with an exact request quota (a sliding log over a
  minute, which nothing leaves within a test) Redis ends up holding one unit per request
  that got an answer from a backend, and none for the ones the backends failed to answer
  (502, 503, 504: given back) or the quota refused (429); a retried or double-counted take
  would leave one too many. The reserved tokens are given back too
  (`test_a_failed_call_uses_none_of_the_quota`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import coredis
import httpx2
import pytest
import trio

from backends.demo.server import DemoConfig, serve_demo_backend
from backends.redis.quota import RedisQuotaStore
from scheduler.service.config import Settings, key_id, load_settings
from tests.conftest import FAST_GPU, start_demo, start_gateway
from tests.support.error_shape import error_fields
from tests.support.fault_proxy import Fault, FaultProxy, serve_fault_proxy

TOKEN = "faults-admin"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
REQUEST_TIMEOUT_S = 1.0  # [server] request_timeout_s
MAX_WAIT_S = 3.0  # the tiers' longest queue wait
INITIAL_LIMIT = 16
MIN_LIMIT = 4
CONFIG = """
[server]
request_timeout_s = {timeout}

[tiers.metered]
weight = 1
max_wait_s = {max_wait}
max_depth = 200
slo_s = 10
[tiers.metered.quota]
algorithm = "sliding_log"
period_s = 60
requests = {requests}
tokens = {tokens}
[tiers.open]
weight = 1
max_wait_s = {max_wait}
max_depth = 200
slo_s = 10

[[keys]]
key = "{key}"
tenant = "metered"
tier = "metered"
[[keys]]
key = "{open_key}"
tenant = "open"
tier = "open"

[models.demo-small]
backends = ["{backend}"]
cache_fresh_s = 0

[backend_limits]
connect_timeout_s = 0.5
eject_s = 0.25
max_eject_s = 1.0

[controller]
initial_limit = {initial_limit}
min_limit = {min_limit}
max_limit = 32
target_latency_s = 0.3
tick_s = 0.1
cooldown_s = 0.3
"""
CHAT = "/v1/chat/completions"
HTTP_TIMEOUT_S = 15.0  # the test client's own bound; the gateway must answer well before
# Arrivals are paced, not fired all in one instant: in this one-process test (client, gateway,
# proxy and demo on one trio loop) a few dozen requests arriving in the same millisecond queue
# the loop for longer than the gateway's 50 ms Redis timeout, and the quota would be decided
# by the fail-open limiter instead (see the module docstring of scheduler.service.quota).
RATE_RPS = 100.0


@pytest.fixture(autouse=True)
def frozen_heap() -> Iterator[None]:
    """The test process (pytest's heap included) is one trio loop: a full garbage collection
    stalls it for longer than the gateway's 50 ms Redis timeout, and a quota decision would
    then fail over to the local limiter although Redis is fine. Frozen objects are not
    scanned again."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    elapsed_s: float
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        return dict(json.loads(self.body)["error"])


@dataclasses.dataclass
class Rig:
    gateway: str
    key: str  # metered: `limit` requests a minute
    open_key: str  # no quota
    limit: int
    settings: Settings
    answers: list[Answer] = dataclasses.field(default_factory=list)  # the metered key's

    async def fire(
        self, client: httpx2.AsyncClient, n: int, *, rate_rps: float = RATE_RPS, key: str = ""
    ) -> list[Answer]:
        """`n` requests sent at `rate_rps` (0: all at once), distinct prompts, each answered
        while the next are sent; the answers in order."""
        key = key or self.key
        answers: list[Answer | None] = [None] * n

        async def one(i: int) -> None:
            body = {
                "model": "demo-small",
                "messages": [{"role": "user", "content": f"fault {uuid.uuid4().hex} {i}"}],
                "max_tokens": 10,
            }
            started = trio.current_time()
            r = await client.post(
                self.gateway + "/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {key}"},
            )
            took = trio.current_time() - started
            answers[i] = Answer(r.status_code, took, dict(r.headers), r.content)

        async with trio.open_nursery() as load:
            for i in range(n):
                load.start_soon(one, i)
                if rate_rps:
                    await trio.sleep(1 / rate_rps)
        done = [a for a in answers if a is not None]
        assert len(done) == n
        if key == self.key:
            self.answers += done
        return done

    async def held(self) -> tuple[int, int]:
        """The (requests, tokens) the metered key holds in Redis now."""
        settings = self.settings
        assert settings.redis_url is not None
        requests, tokens = settings.tier("metered").quotas.specs()
        kid = key_id(self.key, settings.key_secret)
        async with coredis.Redis.from_url(settings.redis_url) as redis:
            store = RedisQuotaStore(redis, prefix=f"{settings.redis_prefix}:quota")
            assert requests is not None
            states = [await store.state(kid, slot="requests", spec=requests)]
            states.append(await store.state(kid, slot="tokens", spec=tokens) if tokens else None)
        held = []
        for state in states:
            assert state is None or isinstance(state, tuple), state  # a sliding log
            held.append(sum(entry.cost for entry in state or ()))
        return held[0], held[1]

    async def limit_now(self, client: httpx2.AsyncClient) -> float:
        r = await client.get(self.gateway + "/admin/v1/controller", headers=ADMIN)
        assert r.status_code == 200, r.text
        return float(r.json()["limit"])


async def start_rig(
    nursery: trio.Nursery,
    redis_url: str,
    tmp_path: Path,
    backend: str,
    *,
    limit: int,
    tokens: int = 0,
    initial_limit: int = INITIAL_LIMIT,
) -> Rig:
    key, open_key = f"sk-fault-{uuid.uuid4().hex}", f"sk-open-{uuid.uuid4().hex}"
    path = tmp_path / "faults.toml"
    path.write_text(
        CONFIG.format(
            timeout=REQUEST_TIMEOUT_S,
            max_wait=MAX_WAIT_S,
            requests=limit,
            tokens=tokens,
            key=key,
            open_key=open_key,
            backend=backend,
            initial_limit=initial_limit,
            min_limit=MIN_LIMIT,
        )
    )
    settings = load_settings(path, env={"SCHEDULER_ADMIN_TOKEN": TOKEN}, overrides={"port": 0})
    settings = dataclasses.replace(settings, redis_url=redis_url)
    return Rig(await start_gateway(nursery, settings), key, open_key, limit, settings)


async def proxied(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path, *, limit: int, tokens: int = 0
) -> tuple[Rig, FaultProxy]:
    demo = await start_demo(nursery, FAST_GPU)
    proxy: FaultProxy = await nursery.start(serve_fault_proxy, demo)
    rig = await start_rig(nursery, redis_url, tmp_path, proxy.url, limit=limit, tokens=tokens)
    return rig, proxy


def check_contract(answers: list[Answer], *, deadline_s: float) -> Counter[int]:
    """What every answer must satisfy whatever the fault; returns the status counts."""
    statuses = Counter(a.status for a in answers)
    assert 500 not in statuses, statuses
    assert {s for s in statuses if s >= 500} <= {502, 503, 504}, statuses
    for a in answers:
        assert a.elapsed_s <= deadline_s, (a.status, a.elapsed_s, deadline_s)
        if a.status in (429, 503):
            assert int(a.headers.get("retry-after", "0")) >= 1, (a.status, a.headers)
        if a.status >= 400:
            error = a.error()
            assert set(error) == error_fields(a.status), error
            assert error["message"], error
    return statuses


async def check_quota_kept(rig: Rig) -> int:
    """Redis holds one request unit per answer a backend gave (2xx, or its own 4xx but 429),
    none for the calls the backends failed (502, 503, 504) or the quota refused (429).

    Redis decides unless a call misses the gateway's Redis timeout (a loop stall: this
    machine runs other suites too); that request is then decided by the fail-open limiter
    (`x-ratelimit-source: local`), its take may or may not have reached Redis, and it is
    given back locally. So with local decisions Redis holds between the units of its own
    answers and that many more. Give-backs run in the background: up to 2 s to land.
    Returns the number of local decisions.
    """
    local = sum(a.headers.get("x-ratelimit-source") == "local" for a in rig.answers)
    served = sum(
        a.headers.get("x-ratelimit-source") != "local"
        and (200 <= a.status < 300 or (400 <= a.status < 500 and a.status != 429))
        for a in rig.answers
    )
    for a in rig.answers:
        assert a.headers["x-ratelimit-limit-requests"] == str(rig.limit), a.headers
        if a.status == 429:
            assert a.headers["x-ratelimit-remaining-requests"] == "0", a.headers

    async def kept() -> bool:
        held, _ = await rig.held()
        return served <= held <= served + local

    with contextlib.suppress(trio.TooSlowError):
        await eventually(kept, within_s=2.0)
    held, _ = await rig.held()
    assert served <= held <= served + local, (held, served, local)
    return local


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float) -> float:
    """Seconds until `check()` holds (polled every 0.05 s); fails after `within_s`."""
    started = trio.current_time()
    with trio.fail_after(within_s):
        while not await check():
            await trio.sleep(0.05)
    return trio.current_time() - started


async def test_a_hanging_backend_is_answered_504_at_the_request_timeout(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    rig, proxy = await proxied(nursery, redis_url, tmp_path, limit=40)
    async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        with trio.fail_after(20):
            assert {a.status for a in await rig.fire(client, 3)} == {200}
            proxy.mode = Fault.HANG
            answers = await rig.fire(client, 24)
            # the gateway let go of every hanging upstream call
            await eventually(lambda: _true(CHAT not in proxy.statistics().hanging), within_s=2.0)
            limit_after = await rig.limit_now(client)
            proxy.mode = Fault.PASS
            after = await rig.fire(client, 5)

    statuses = check_contract(answers, deadline_s=MAX_WAIT_S + REQUEST_TIMEOUT_S + 1.0)
    assert set(statuses) <= {503, 504}, statuses
    assert statuses[504] >= 16, statuses  # at least the first window times out
    for a in answers:
        if a.status == 504:
            assert a.error()["code"] == "timeout"
            assert a.elapsed_s >= REQUEST_TIMEOUT_S * 0.9, a.elapsed_s
    assert proxy.statistics().hung[CHAT] == statuses[504]
    assert limit_after < INITIAL_LIMIT  # timeouts count as drops: the controller backed off
    assert {a.status for a in after} == {200}
    await check_quota_kept(rig)


async def test_backend_500s_become_502_and_never_500(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    rig, proxy = await proxied(nursery, redis_url, tmp_path, limit=30)
    async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        with trio.fail_after(20):
            proxy.mode = Fault.ERROR_500
            answers = await rig.fire(client, 36)  # more than the quota holds
            proxy.mode = Fault.PASS
            after = await rig.fire(client, 5, key=rig.open_key)

    statuses = check_contract(answers, deadline_s=1.0)
    assert set(statuses) <= {502, 429}, statuses
    for a in answers:
        if a.status == 502:
            assert a.error()["type"] == "server_error"
            assert a.error()["code"] == "bad_gateway"
    assert proxy.statistics().failed_500[CHAT] == statuses[502]  # each call made once
    assert {a.status for a in after} == {200}
    await check_quota_kept(rig)
    # each failed call gave its unit back at once, so more failed than the quota holds
    assert statuses[502] > rig.limit, statuses


async def test_a_slow_backend_still_answers_and_the_limit_backs_off(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    rig, proxy = await proxied(nursery, redis_url, tmp_path, limit=50)
    limits: list[float] = []
    async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:

        async def watch() -> None:
            while True:
                limits.append(await rig.limit_now(client))
                await trio.sleep(0.1)

        with trio.fail_after(20):
            before = await rig.limit_now(client)
            proxy.mode = Fault.slow(0.5)  # over the 0.3 s latency target, under the timeout
            async with trio.open_nursery() as watching:
                watching.start_soon(watch)
                answers = await rig.fire(client, 40, rate_rps=40)
                watching.cancel_scope.cancel()

    statuses = check_contract(answers, deadline_s=MAX_WAIT_S + 0.5 + 1.0)
    assert statuses == Counter({200: 40}), statuses
    assert all(a.elapsed_s >= 0.5 for a in answers)
    # multiplied down, more than once, from the highest it reached (slow start may first
    # have grown it while the first slow answers were on their way)
    peak = max([before, *limits])
    after_peak = limits[limits.index(peak) :] if peak in limits else limits
    assert min(after_peak) <= 0.5 * peak, (before, limits)
    await check_quota_kept(rig)


async def _true(value: bool) -> bool:
    return value


class RestartableDemo:
    """The demo backend, stopped and started again on the same port."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.port = 0
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()

    async def start(self) -> None:
        self._scope, self._stopped = trio.CancelScope(), trio.Event()
        self.port = await self._nursery.start(self._serve, self.port)

    async def _serve(self, port: int, *, task_status: trio.TaskStatus[int]) -> None:
        try:
            with self._scope:
                await serve_demo_backend(
                    DemoConfig(gpu=FAST_GPU), port=port, task_status=task_status
                )
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        self._scope.cancel()
        await self._stopped.wait()


@pytest.mark.parametrize("how", ["demo restarted", "proxy refusing"])
async def test_a_backend_that_goes_away_is_ejected_then_back_within_seconds(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path, how: str
) -> None:
    if how == "demo restarted":  # the gateway talks to the demo itself: a real restart
        demo = RestartableDemo(nursery)
        await demo.start()
        rig = await start_rig(
            nursery, redis_url, tmp_path, f"http://127.0.0.1:{demo.port}", limit=60
        )
        stop, start = demo.stop, demo.start
    else:  # the proxy stops listening and drops its connections, then listens again
        rig, proxy = await proxied(nursery, redis_url, tmp_path, limit=60)

        async def stop() -> None:
            proxy.mode = Fault.REFUSE
            await eventually(lambda: _true(not proxy.statistics().listening), within_s=1.0)

        async def start() -> None:
            proxy.mode = Fault.PASS
            await eventually(lambda: _true(proxy.statistics().listening), within_s=1.0)

    async def serves() -> bool:
        (answer,) = await rig.fire(client, 1, key=rig.open_key)
        check_contract([answer], deadline_s=1.0)
        assert answer.status in (200, 503), answer
        return answer.status == 200

    async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        with trio.fail_after(25):
            assert {a.status for a in await rig.fire(client, 5)} == {200}
            await stop()
            down = await rig.fire(client, 30, rate_rps=50)
            await start()
            recovered_s = await eventually(serves, within_s=5.0)
            after = await rig.fire(client, 20)

    statuses = check_contract(down, deadline_s=1.0)  # quickly: nothing waits on a dead backend
    assert statuses == Counter({503: 30}), statuses
    for a in down:
        assert a.error()["code"] == "overloaded"
    assert recovered_s <= 3.0, recovered_s  # eject_s 0.25 doubling to 1 s, probed every 0.5 s
    assert {a.status for a in after} == {200}
    await check_quota_kept(rig)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault.ERROR_500, id="502"),
        pytest.param(Fault.REFUSE, id="503-unavailable"),
    ],
)
async def test_a_failed_call_uses_none_of_the_quota(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path, fault: Fault
) -> None:
    """DESIGN §2.6: a backend failure never uses up the caller's quota: the request and the
    tokens reserved at admission are both given back, so more failed calls than the quota
    holds, one after another, all reach the backends and none is refused."""
    rig, proxy = await proxied(nursery, redis_url, tmp_path, limit=10, tokens=100_000)
    local = 0

    async def given_back() -> bool:
        requests, tokens = await rig.held()
        return requests <= local and (tokens == 0 or local > 0)

    async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        with trio.fail_after(20):
            proxy.mode = fault
            for _ in range(15):
                (a,) = await rig.fire(client, 1)
                check_contract([a], deadline_s=2.0)
                assert a.status in (502, 503), a
                local += a.headers.get("x-ratelimit-source") == "local"
                await eventually(given_back, within_s=2.0)  # in the background, at once
    await check_quota_kept(rig)


async def test_a_dripping_backend_is_cut_at_the_request_timeout(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    rig, proxy = await proxied(nursery, redis_url, tmp_path, limit=10)
    async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        with trio.fail_after(15):
            proxy.mode = Fault.drip(0.3, pieces=8)  # the body over 2.4 s, each piece in time
            answers = await rig.fire(client, 3)
    check_contract(answers, deadline_s=REQUEST_TIMEOUT_S + 0.5)
    assert {a.status for a in answers} == {504}
