from __future__ import annotations

import pytest

from policies.ladder import CacheState, ShedLadder, Step


def test_default_ladder_tries_cache_then_fallback() -> None:
    ladder = ShedLadder()
    assert ladder.steps == (Step.CACHE, Step.FALLBACK)
    assert ladder.serve_stale
    assert ladder.names() == ("cache", "fallback")


@pytest.mark.parametrize(
    ("cache", "headroom", "serve_stale", "expected"),
    [
        (CacheState.FRESH, False, True, Step.CACHE),
        (CacheState.FRESH, True, False, Step.CACHE),
        (CacheState.STALE, True, True, Step.CACHE),
        (CacheState.STALE, True, False, Step.FALLBACK),
        (CacheState.STALE, False, False, Step.REJECT),
        (CacheState.MISS, True, True, Step.FALLBACK),
        (CacheState.MISS, False, True, Step.REJECT),
    ],
)
def test_choose_walks_the_default_ladder(
    cache: CacheState, headroom: bool, serve_stale: bool, expected: Step
) -> None:
    ladder = ShedLadder(serve_stale=serve_stale)
    assert ladder.choose(cache=cache, fallback_has_headroom=headroom) is expected


def test_order_matters() -> None:
    ladder = ShedLadder(steps=(Step.FALLBACK, Step.CACHE))
    assert ladder.choose(cache=CacheState.FRESH, fallback_has_headroom=True) is Step.FALLBACK
    assert ladder.choose(cache=CacheState.FRESH, fallback_has_headroom=False) is Step.CACHE


def test_an_empty_ladder_rejects() -> None:
    ladder = ShedLadder(steps=())
    assert ladder.choose(cache=CacheState.FRESH, fallback_has_headroom=True) is Step.REJECT


def test_from_names() -> None:
    assert ShedLadder.from_names(["cache", "fallback"]) == ShedLadder()
    assert ShedLadder.from_names([" Fallback ", "reject"], serve_stale=False) == ShedLadder(
        steps=(Step.FALLBACK,), serve_stale=False
    )
    assert ShedLadder.from_names([]) == ShedLadder(steps=())
    assert ShedLadder.from_names(("reject",)).steps == ()


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["cache", "cahce"], r"ladder\.steps\[1\]: unknown step 'cahce'"),
        (["cache", 3], r"ladder\.steps\[1\]: unknown step 3"),
        (["fallback", "cache", "fallback"], r"ladder\.steps\[2\]: duplicate step 'fallback'"),
        (["reject", "cache"], r"ladder\.steps\[0\]: 'reject' must be the last step"),
        ("cache", r"ladder\.steps must be a list"),
    ],
)
def test_from_names_names_the_bad_entry(names: list[object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShedLadder.from_names(names)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": (Step.CACHE, Step.CACHE)}, r"ladder\.steps\[1\]: duplicate step 'cache'"),
        ({"steps": (Step.CACHE, Step.REJECT)}, r"ladder\.steps\[1\]: reject is implied"),
        ({"steps": ("cache",)}, r"ladder\.steps\[0\] must be a Step"),
        ({"serve_stale": "yes"}, r"ladder\.serve_stale must be a bool"),
    ],
)
def test_bad_ladder_names_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShedLadder(**kwargs)  # type: ignore[arg-type]
