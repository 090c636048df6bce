"""A faulty backend under load: the gateway answers every request, with the right error.

gateway -> fault proxy (`tests.support.fault_proxy`) -> demo backend, all on loopback, with a
real Redis. For each fault a modest concurrent load is sent with one key that has a small
request quota, and every test checks the same contract:

- every request is answered, within its deadline (queue wait plus the request timeout);
- no 500, and no 5xx but 502 (the backend failed), 503 (no capacity, no backend) and 504
  (the backend did not answer in time); every error is OpenAI-shaped;
- every 429 and 503 carries Retry-After;
- the quota is taken exactly once per request the gateway decided, whatever the backend did:
  with an exact (sliding log) request quota the `x-ratelimit-remaining-requests` values of a
  run are exactly limit-1, limit-2, ... with no gap (a retried or double-counted take would
  leave one). The request quota is spent at admission and not given back on a failed call;
  the reserved tokens are (see `test_a_failed_call_gives_back_its_reserved_tokens`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from backends.demo import DemoConfig, serve_demo_backend
from scheduler.service.config import load_settings
from tests.conftest import FAST_GPU, start_demo, start_gateway
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
    return Rig(await start_gateway(nursery, settings), key, open_key, limit)


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
            assert set(error) == {"message", "type", "param", "code"}, error
            assert error["message"], error
    return statuses


def check_quota_taken_once(rig: Rig) -> int:
    """Each decided request took one unit of the request quota in Redis, refused ones none.

    Redis decides unless a call misses the gateway's 50 ms Redis timeout (a loop stall: this
    machine runs other suites too); that request is then decided by the fail-open limiter
    (`x-ratelimit-source: local`), and its take may or may not have reached Redis. So: Redis'
    answers are distinct, and Redis never counted more takes than there were requests; with
    no local decision, the remaining values are exactly limit-1, limit-2, ... with no gap.
    Returns the number of local decisions.
    """
    remaining, local = [], 0
    for a in rig.answers:
        assert a.headers["x-ratelimit-limit-requests"] == str(rig.limit), a.headers
        left = int(a.headers["x-ratelimit-remaining-requests"])
        if a.headers.get("x-ratelimit-source") == "local":
            local += 1
        elif a.status == 429:
            assert left == 0, a.headers
        else:
            remaining.append(left)
    remaining.sort(reverse=True)
    assert len(set(remaining)) == len(remaining), remaining
    if local == 0:
        assert remaining == list(range(rig.limit - 1, rig.limit - 1 - len(remaining), -1)), (
            remaining
        )
    elif remaining:
        assert remaining[0] <= rig.limit - 1, remaining
        assert remaining[-1] >= rig.limit - len(remaining) - local, (remaining, local)
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
    check_quota_taken_once(rig)


async def test_backend_500s_become_502_and_never_500(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    rig, proxy = await proxied(nursery, redis_url, tmp_path, limit=30)
    async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        with trio.fail_after(20):
            proxy.mode = Fault.ERROR_500
            answers = await rig.fire(client, 36)  # six more than the quota holds
            proxy.mode = Fault.PASS
            after = await rig.fire(client, 5, key=rig.open_key)

    statuses = check_contract(answers, deadline_s=1.0)
    assert set(statuses) == {502, 429}, statuses
    for a in answers:
        if a.status == 502:
            assert a.error()["type"] == "server_error"
            assert a.error()["code"] == "bad_gateway"
    assert proxy.statistics().failed_500[CHAT] == statuses[502]  # each call made once
    assert {a.status for a in after} == {200}
    if check_quota_taken_once(rig) == 0:  # all decided by Redis: exactly the quota
        assert statuses == Counter({502: 30, 429: 6}), statuses


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
    assert min(limits) <= 0.5 * before, (before, limits)  # multiplied down, more than once
    check_quota_taken_once(rig)


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
    check_quota_taken_once(rig)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault.ERROR_500, id="502"),
        pytest.param(Fault.REFUSE, id="503-unavailable"),
    ],
)
async def test_a_failed_call_gives_back_its_reserved_tokens(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path, fault: Fault
) -> None:
    """DESIGN §2.6: a backend failure never uses up the caller's quota. The request quota is
    spent at admission (one per decided request); the tokens reserved are all given back."""
    rig, proxy = await proxied(nursery, redis_url, tmp_path, limit=10, tokens=100_000)
    async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        with trio.fail_after(10):
            proxy.mode = fault
            remaining: list[int] = []
            for _ in range(8):  # the same estimate each time: prompts of equal length
                (a,) = await rig.fire(client, 1)
                check_contract([a], deadline_s=2.0)
                assert a.status in (502, 503), a
                if a.headers.get("x-ratelimit-source") != "local":  # Redis' count only
                    remaining.append(int(a.headers["x-ratelimit-remaining-tokens"]))
                if len(remaining) == 3:
                    break
                await trio.sleep(0.3)  # the settlement runs in the background
    check_quota_taken_once(rig)
    assert len(remaining) == 3 and remaining[0] == remaining[1] == remaining[2], remaining


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
