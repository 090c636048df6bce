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
from backends.redis.pipeliner import LoopLag
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
            before_s, blocked_at = lag.total_s, trio.current_time()
            block_loop(BLOCK_S)
            await lag.wait_ticked_after(trio.current_time())
            elapsed_s = trio.current_time() - blocked_at
            nursery.cancel_scope.cancel()
    assert BLOCK_S * 0.9 <= lag.total_s - before_s <= elapsed_s
