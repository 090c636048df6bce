"""The pipeliner against a real Redis: concurrent callers share round trips, each gets its
own reply or error, and a failed round trip fails only its own callers, in the same terms as
a direct call."""

from __future__ import annotations

import gc
import uuid
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import coredis
import coredis.exceptions
import pytest
import trio

from backends.redis.embedded import EmbeddedRedis, free_port
from backends.redis.pipeliner import RedisPipeliner
from backends.redis.topology import open_redis
from tests.conftest import open_pipelined

DEADLINE_S = 10.0


@asynccontextmanager
async def open_pipeliner(url: str, **options: float) -> AsyncIterator[RedisPipeliner]:
    async with open_pipelined(url, **options) as (_, pipeliner):
        yield pipeliner


async def test_concurrent_callers_share_round_trips_and_get_their_own_replies(
    redis_url: str,
) -> None:
    prefix = uuid.uuid4().hex
    replies: dict[int, object] = {}
    with trio.fail_after(DEADLINE_S):
        async with open_pipeliner(redis_url) as pipeliner:

            async def caller(i: int) -> None:
                key = f"{prefix}:{i}"
                await pipeliner.execute(lambda pipe: pipe.set(key, str(i)))
                replies[i] = await pipeliner.execute(lambda pipe: pipe.get(key))

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(caller, i)
            assert pipeliner.commands == 400
            assert pipeliner.round_trips <= 40  # 400 alone; batches of 10 and more
    assert replies == {i: str(i).encode() for i in range(200)}


async def test_a_commands_own_error_reaches_only_its_caller(redis_url: str) -> None:
    key = uuid.uuid4().hex
    with trio.fail_after(DEADLINE_S):
        async with open_pipeliner(redis_url) as pipeliner:
            await pipeliner.execute(lambda pipe: pipe.set(key, "text"))
            good, bad = None, None

            async def wrong_type() -> None:
                nonlocal bad
                with pytest.raises(coredis.exceptions.WrongTypeError) as raised:
                    await pipeliner.execute(lambda pipe: pipe.hgetall(key))
                bad = raised.value

            async def right_type() -> None:
                nonlocal good
                good = await pipeliner.execute(lambda pipe: pipe.get(key))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wrong_type)
                nursery.start_soon(right_type)
            assert pipeliner.round_trips == 2  # the SET, then both together
    assert good == b"text" and bad is not None


async def test_scripts_survive_a_script_flush(redis_url: str) -> None:
    with trio.fail_after(DEADLINE_S):
        async with coredis.Redis.from_url(redis_url) as redis:
            script = redis.register_script("return ARGV[1] + 1")
            async with open_pipeliner(redis_url) as pipeliner:
                assert await pipeliner.evalsha(script, [], [41]) == 42
                await redis.script_flush()
                assert await pipeliner.evalsha(script, [], [1]) == 2  # loaded again


async def test_a_caller_that_gives_up_before_sending_takes_its_command_back(
    redis_url: str,
) -> None:
    key = uuid.uuid4().hex
    with trio.fail_after(DEADLINE_S):
        async with (
            coredis.Redis.from_url(redis_url) as redis,
            # one round trip at a time: a command waits unsent only while every one is out
            open_pipeliner(redis_url, round_trips=1) as pipeliner,
            trio.open_nursery() as nursery,
        ):
            await pipeliner.execute(lambda pipe: pipe.ping())  # connected before the pause
            await redis.client_pause(400)
            nursery.start_soon(pipeliner.execute, lambda pipe: pipe.ping())
            while pipeliner.commands < 2:  # until that PING is out (and held by the pause)
                await trio.sleep(0.001)
            with trio.move_on_after(0.05):  # queued behind it, then given up
                await pipeliner.execute(lambda pipe: pipe.set(key, "1"))
            assert await pipeliner.execute(lambda pipe: pipe.exists([key])) == 0
            assert pipeliner.commands == 3  # the two PINGs and the EXISTS


async def test_an_unreachable_redis_fails_each_caller_as_a_direct_call_would() -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_pipeliner(f"redis://127.0.0.1:{free_port()}") as pipeliner:

            async def caller() -> None:
                with pytest.raises(coredis.exceptions.ConnectionError):
                    await pipeliner.execute(lambda pipe: pipe.ping())

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(caller)


async def test_a_round_trip_over_its_timeout_fails_as_too_slow(redis_url: str) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            coredis.Redis.from_url(redis_url) as redis,
            open_pipeliner(redis_url, timeout_s=0.1) as pipeliner,
        ):
            await pipeliner.execute(lambda pipe: pipe.ping())  # connected before the pause
            await redis.client_pause(600)
            with pytest.raises(trio.TooSlowError):
                await pipeliner.execute(lambda pipe: pipe.ping())
            await redis.ping()  # returns when the pause is over
            assert await pipeliner.execute(lambda pipe: pipe.ping())


async def test_a_command_sent_soon_runs_and_only_its_failure_is_told(redis_url: str) -> None:
    """`execute_soon` waits for nothing: the command runs in a later round trip, its reply
    is dropped, and its own error (or a script Redis no longer knows, sent again on its own)
    reaches `on_error` from the pipeliner's task; so does a script's, from the own connection
    (the batch has both kinds)."""
    prefix = uuid.uuid4().hex
    errors: list[BaseException] = []
    with trio.fail_after(DEADLINE_S):
        async with open_pipelined(redis_url) as (redis, pipeliner):
            script = redis.register_script("return redis.call('SET', KEYS[1], ARGV[1])")
            await redis.script_flush()
            hset = redis.register_script("return redis.call('HSET', KEYS[1], 'f', 1)")
            await redis.script_load(hset.script)
            pipeliner.execute_soon(lambda pipe: pipe.set(f"{prefix}:a", "1"), errors.append)
            pipeliner.execute_soon(lambda pipe: pipe.incr(f"{prefix}:a"), errors.append)
            pipeliner.execute_soon(lambda pipe: pipe.hset(f"{prefix}:a", {"f": 1}), errors.append)
            pipeliner.evalsha_soon(script, [f"{prefix}:s"], ["loaded"], errors.append)
            pipeliner.evalsha_soon(hset, [f"{prefix}:a"], [], errors.append)
            while await redis.get(f"{prefix}:s") is None:  # NOSCRIPT, then run alone
                await trio.sleep(0.01)
            assert await pipeliner.execute(lambda pipe: pipe.get(f"{prefix}:a")) == b"2"
    assert len(errors) == 2  # HSET on a string, as a command and in a script; nothing else
    for error in errors:
        assert isinstance(error, coredis.exceptions.ResponseError)
    assert pipeliner.own_commands == 2


SET_SCRIPT = "return redis.call('SET', KEYS[1], ARGV[1])"
SLOW_SCRIPT = """local s = redis.call('TIME')
repeat local n = redis.call('TIME') until (n[1] - s[1]) * 1000000 + n[2] - s[2] > 50000
return redis.call('SET', KEYS[1], 'slow')"""  # holds Redis (and its connection) for 50 ms


async def test_scripts_on_the_own_connection_authenticate_and_select_the_database() -> None:
    """Off a cluster, scripts go on the pipeliner's own connection: it logs in as the
    client's user (the default user needs a password here) and uses the client's database."""
    with EmbeddedRedis() as server, trio.fail_after(DEADLINE_S):
        async with coredis.Redis(port=server.port) as admin:
            await admin.acl_setuser("gateway", "on", ">secret", "~*", "+@all")
            await admin.config_set({"requirepass": "unused"})
        url = f"redis://gateway:secret@127.0.0.1:{server.port}/3"
        async with open_pipelined(url) as (redis, pipeliner):
            script = redis.register_script(SET_SCRIPT)
            await redis.script_load(SET_SCRIPT)  # else NOSCRIPT: sent again through coredis
            assert await pipeliner.evalsha(script, ["k"], ["v"]) == b"OK"
            assert await redis.get("k") == b"v"  # coredis's own connection: database 3
        async with coredis.Redis(port=server.port, username="gateway", password="secret") as db0:
            assert await db0.get("k") is None


async def test_a_dropped_own_connection_is_opened_again(redis_url: str) -> None:
    key = uuid.uuid4().hex
    with trio.fail_after(DEADLINE_S):
        # one round trip at a time: each goes on the one own connection (with several, the
        # second may go on one not yet opened, and succeed)
        async with open_pipelined(redis_url, round_trips=1) as (redis, pipeliner):
            script = redis.register_script(SET_SCRIPT)
            assert await pipeliner.evalsha(script, [key], ["1"]) == b"OK"
            await redis.client_kill(type_=coredis.PureToken.NORMAL, skipme=True)
            with pytest.raises(coredis.exceptions.ConnectionError):
                await pipeliner.evalsha(script, [key], ["2"])
            assert await pipeliner.evalsha(script, [key], ["3"]) == b"OK"
            assert await redis.get(key) == b"3"


async def test_a_command_queued_while_a_round_trip_is_out_is_sent_at_once(
    redis_url: str,
) -> None:
    """Several round trips are in flight together: a command does not wait for the one out
    (here a BLPOP that Redis holds for 0.5 s, without blocking the server)."""
    key = uuid.uuid4().hex
    with trio.fail_after(DEADLINE_S):
        async with open_pipeliner(redis_url) as pipeliner:
            await pipeliner.execute(lambda pipe: pipe.ping())  # connected
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipeliner.execute, lambda pipe: pipe.blpop([key], timeout=0.5))
                await trio.sleep(0.05)  # the BLPOP is out
                sent_at = trio.current_time()
                assert await pipeliner.execute(lambda pipe: pipe.ping())
                assert trio.current_time() - sent_at < 0.25  # not after the BLPOP's 0.5 s


async def test_every_own_connection_is_closed_when_it_is_cancelled(redis_url: str) -> None:
    """A gateway that stops cancels its pipeliner: each own connection it opened is closed
    then, not left to the garbage collector (closing the first let the cancellation through
    and skipped the others: a gateway that had two open left one open on the server until a
    collection found it)."""
    key = uuid.uuid4().hex

    async def script_clients() -> set[str]:
        async with open_redis(redis_url) as redis:
            listed = await redis.client_list()
        return {c["addr"] for c in listed if c.get("cmd") == "evalsha"}

    with trio.fail_after(DEADLINE_S), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        before = await script_clients()
        async with open_pipelined(redis_url, round_trips=2) as (redis, pipeliner):
            slow, script = redis.register_script(SLOW_SCRIPT), redis.register_script(SET_SCRIPT)
            for text in (SLOW_SCRIPT, SET_SCRIPT):  # loaded: no fallback through coredis
                await redis.script_load(text)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipeliner.evalsha, slow, [key], [])
                await trio.sleep(0.01)  # the slow one is out on the first own connection
                await pipeliner.evalsha(script, [key], ["1"])  # so this one opens the second
            assert len(await script_clients() - before) == 2
        gc.collect()  # a socket left open is closed here, with a ResourceWarning
    assert not [w for w in caught if "unclosed" in str(w.message)]
