"""Redis's failures translated once: RedisUnavailable from coredis, OS and timeout errors."""

from __future__ import annotations

import coredis.exceptions
import pytest
import trio

from backends.redis.errors import RedisUnavailable, translated_redis_errors


@pytest.mark.parametrize(
    "raised",
    [coredis.exceptions.ConnectionError("reset"), ConnectionRefusedError(), trio.TooSlowError()],
)
def test_a_redis_failure_becomes_redis_unavailable(raised: Exception) -> None:
    with pytest.raises(RedisUnavailable) as caught, translated_redis_errors():
        raise raised
    assert caught.value.kind == type(raised).__name__
    assert caught.value.__cause__ is raised


def test_a_group_of_redis_failures_becomes_one() -> None:
    group = ExceptionGroup("client", [coredis.exceptions.ConnectionError("reset")])
    with pytest.raises(RedisUnavailable) as caught, translated_redis_errors():
        raise group
    assert caught.value.kind == "ConnectionError"


def test_in_a_mixed_group_only_the_redis_failures_are_replaced() -> None:
    group = ExceptionGroup("client", [KeyError("k"), OSError("reset")])
    with pytest.raises(ExceptionGroup) as caught, translated_redis_errors():
        raise group
    kinds = [type(e) for e in caught.value.exceptions]
    assert kinds == [KeyError, RedisUnavailable]


def test_other_errors_pass_untouched() -> None:
    with pytest.raises(KeyError), translated_redis_errors():
        raise KeyError("k")
