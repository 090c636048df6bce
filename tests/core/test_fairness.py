"""Jain's fairness index per tier (issue 17, item 9): the statistic, with explicit times."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core import Request, TierConfig, WeightedFairQueue
from scheduler.core.fairness import FairnessWindow, fair_share_index, jain_index, max_min_shares

ids = itertools.count()


def test_jain_index_is_one_when_equal_and_one_over_n_when_one_has_everything() -> None:
    assert jain_index([5.0, 5.0, 5.0]) == 1.0
    assert jain_index([9.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    assert jain_index([3.0, 1.0]) == pytest.approx(16 / 20)
    assert jain_index([]) == jain_index([0.0, 0.0]) == 1.0


def test_max_min_shares_fill_the_small_demands_first() -> None:
    assert max_min_shares([10.0, 20_000.0], 10_010.0) == [10.0, 10_000.0]
    assert max_min_shares([30.0, 10.0, 30.0], 50.0) == [20.0, 10.0, 20.0]
    assert max_min_shares([1.0, 2.0], 100.0) == [1.0, 2.0]  # supply beyond every demand


def test_a_light_key_served_all_it_asked_is_fair_beside_a_backlogged_one() -> None:
    # raw throughputs 10 : 10 000 would score 0.5; against the fair shares, 1
    assert fair_share_index([10.0, 20_000.0], [10.0, 10_000.0]) == pytest.approx(1.0)
    # the light key starved instead: one of two keys got nothing of its share
    assert fair_share_index([10.0, 20_000.0], [0.0, 10_000.0]) == pytest.approx(0.5, abs=0.01)


def test_the_window_forgets_what_left_it() -> None:
    window = FairnessWindow(window_s=10.0)
    for t in range(5):
        window.record("pro", "a", cost=100, admitted=True, now=t)
        window.record("pro", "b", cost=100, admitted=False, now=t)  # shed every time
    assert window.index("pro", now=5.0) == pytest.approx(0.5)
    assert window.active_keys("pro", now=5.0) == 2
    window.record("pro", "b", cost=100, admitted=True, now=12.0)
    # the window (4.5, 14.5] holds only b's admission at 12
    assert window.active_keys("pro", now=14.5) == 1
    assert window.index("pro", now=14.5) == 1.0
    assert window.index("pro", now=30.0) == 1.0 and window.active_keys("pro", now=30.0) == 0
    assert window.index("free", now=30.0) == 1.0  # a tier never seen


def req(key: str, cost: float) -> Request:
    return Request(next(ids), "tenant", "pro", key, "m", cost, 0.0)


@settings(max_examples=40, deadline=None)
@given(
    costs=st.lists(st.integers(1, 300), min_size=1, max_size=6),
    keys=st.integers(2, 5),
    served_share=st.floats(0.2, 0.8),
)
def test_the_fair_queue_scores_near_one_where_first_come_first_served_scores_one_over_n(
    costs: list[int], keys: int, served_share: float
) -> None:
    # Every key backlogged with the same demand; part of it is served, the rest shed at its
    # deadline. The fair queue's service is within a request or two of equal; serving the
    # requests in arrival order, key by key, gives the first keys everything.
    per_key = len(costs) * math.ceil(40 / len(costs))  # whole turns: equal demands
    pushed = [(f"k{k}", costs[(k + n) % len(costs)]) for k in range(keys) for n in range(per_key)]
    demand = sum(c for _, c in pushed)
    budget = served_share * demand
    queue = WeightedFairQueue([TierConfig("pro", 1, max_wait_s=1e9, max_depth=10**9)])
    for key, cost in pushed:
        queue.push(req(key, cost), now=0.0)
    fair, fifo = FairnessWindow(60.0), FairnessWindow(60.0)
    served = 0.0
    while (entry := queue.pop()) is not None:
        admitted = served < budget
        served += entry.request.cost if admitted else 0.0
        fair.record("pro", entry.request.key_id, cost=entry.request.cost, admitted=admitted, now=1)
    served, serving = 0.0, True
    for key, cost in pushed:  # key by key, as they were pushed, until the budget is out
        serving = serving and served + cost <= budget
        served += cost if serving else 0.0
        fifo.record("pro", key, cost=cost, admitted=serving, now=1.0)
    # each key within two of the largest requests of the mean S / n (the queue's pairwise
    # bound), and S >= budget: every ratio within `lag` of 1, their mean exactly 1
    lag = 2 * max(costs) / (budget / keys)
    assert fair.index("pro", now=1.0) >= 1 / (1 + lag * lag) - 1e-9
    # m keys served whole and one in part (f): (m + f)^2 / (n (m + f^2)) <= (m + 1) / n, as
    # (f - 1)^2 >= 0; and m + f <= the served share of the n keys (equal demands)
    assert fifo.index("pro", now=1.0) <= math.ceil(served_share * keys) / keys + 1e-9
