"""A pipelined call's `timeout_s` is Redis's time, not this process's: a deadline that passes
while our own event loop is blocked is not a slow Redis, and a Redis that stops answering
while the loop keeps up still fails the call within its timeout. Real redis-servers."""

from __future__ import annotations

import signal
import time
import uuid

import pytest
import trio

from backends.redis.embedded import EmbeddedRedis, free_port
from backends.redis.loop_lag import LoopLag
from tests.conftest import open_pipelined

DEADLINE_S = 10.0
TIMEOUT_S = 0.02
BLOCK_S = 0.1  # five timeouts


def block_loop(duration_s: float) -> None:
    """Hold the event loop, as a CPU-bound stretch of this process would."""
    until = time.perf_counter() + duration_s
    while time.perf_counter() < until:
        pass


async def test_a_deadline_passed_while_the_loop_was_blocked_is_not_a_slow_redis(
    redis_url: str,
) -> None:
    key = uuid.uuid4().hex
    with trio.fail_after(DEADLINE_S):
        async with open_pipelined(redis_url) as (_, pipeliner):
            await pipeliner.execute(lambda pipe: pipe.set(key, "v"))
            for _ in range(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_block_soon)
                    started_at = trio.current_time()
                    reply = await pipeliner.execute(lambda pipe: pipe.get(key), timeout_s=TIMEOUT_S)
                    assert trio.current_time() - started_at >= BLOCK_S  # it was blocked
                    assert reply == b"v"
            assert pipeliner.lag.total_s >= 5 * BLOCK_S * 0.9


async def _block_soon() -> None:
    block_loop(BLOCK_S)


async def test_a_paused_redis_fails_the_call_within_its_timeout() -> None:
    with EmbeddedRedis(port=free_port()) as server, trio.fail_after(DEADLINE_S):
        async with open_pipelined(server.url) as (_, pipeliner):
            await pipeliner.execute(lambda pipe: pipe.ping())
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                started_at = trio.current_time()
                with pytest.raises(trio.TooSlowError):
                    await pipeliner.execute(lambda pipe: pipe.ping(), timeout_s=TIMEOUT_S)
                took_s = trio.current_time() - started_at
            finally:
                server.process.send_signal(signal.SIGCONT)
            # within its timeout (plus what lag a busy machine adds), long before the round
            # trip's own timeout (2 s) would fail it
            assert TIMEOUT_S <= took_s < 0.3, took_s
            assert await pipeliner.execute(lambda pipe: pipe.ping(), timeout_s=1.0)


async def test_loop_lag_sums_how_late_its_ticks_wake() -> None:
    lag = LoopLag(tick_s=0.005)
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(lag.run)
            await trio.sleep(0.05)
            # what it had counted, and up to when: its latest tick, when its next sleep
            # began (not now: this task may run late after a tick already due, on a busy
            # machine, and that lateness is counted too)
            before_s, counted_to = lag.total_s, lag.ticked_at
            block_loop(BLOCK_S)
            await lag.wait_ticked_after(trio.current_time())
            elapsed_s = trio.current_time() - counted_to
            nursery.cancel_scope.cancel()
    assert BLOCK_S * 0.9 <= lag.total_s - before_s <= elapsed_s


SLOW_SCRIPT = """
local t = redis.call('TIME')
local stop = t[1] * 1000000 + t[2] + tonumber(ARGV[1])
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= stop
return 1
"""


async def test_a_command_queued_behind_other_round_trips_is_timed_from_its_own(
    redis_url: str,
) -> None:
    """A burst bigger than a batch takes several round trips, one after another: a command
    waiting for its turn waits on this process, not on Redis, so a timeout shorter than the
    burst but longer than each round trip fails none of them."""
    with trio.fail_after(DEADLINE_S):
        async with open_pipelined(redis_url, max_batch=1) as (redis, pipeliner):
            script = redis.register_script(SLOW_SCRIPT)
            await redis.script_load(SLOW_SCRIPT)
            results: list[object] = []

            async def caller() -> None:  # each round trip takes Redis 5 ms
                try:
                    results.append(
                        await pipeliner.evalsha(script, [uuid.uuid4().hex], [5000], timeout_s=0.03)
                    )
                except trio.TooSlowError as exc:
                    results.append(exc)

            started_at = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(caller)
            assert trio.current_time() - started_at >= 0.1  # the burst outlasted the timeout
    assert results == [1] * 20
