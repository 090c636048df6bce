"""The collector's policy of a serving process: applied once the replica has started (the
figures behind it are in bench/RESULTS.md, "The garbage collector")."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import trio

from scheduler.service.replica import GC_THRESHOLDS
from tests.conftest import gateway_settings, start_demo, start_gateway


@pytest.fixture
def python_defaults() -> Iterator[None]:
    """The collector as a fresh interpreter has it, and as it was after the test."""
    before = gc.get_threshold()
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("python_defaults")
async def test_a_started_replica_runs_the_collector_at_its_thresholds(
    nursery: trio.Nursery, redis_url: str
) -> None:
    with trio.fail_after(10):
        await start_gateway(nursery, gateway_settings(await start_demo(nursery), redis_url))
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 0  # start-up's objects are out of every pass
