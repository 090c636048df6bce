"""The weighted fair queue: shares by weight and by key, no starvation, expiry on time."""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core import Request, TierConfig, WeightedFairQueue
from scheduler.core.wfq import Entry

ids = itertools.count()


def req(
    tier: str, key: str, *, cost: float = 1.0, at: float = 0.0, deadline_at: float = math.inf
) -> Request:
    return Request(next(ids), "tenant", tier, key, "m", cost, at, deadline_at)


def backlogged_queue(
    weights: list[int], keys: int, costs: list[int], goal: float
) -> WeightedFairQueue:
    """Tiers t0.. with `keys` keys each, every key holding more than its share of `goal`."""
    tiers = [TierConfig(f"t{i}", w, max_wait_s=1e9, max_depth=10**9) for i, w in enumerate(weights)]
    queue = WeightedFairQueue(tiers)
    cost_cycle = itertools.cycle(costs)
    for t in tiers:
        per_key = math.ceil(1.3 * goal * t.weight / sum(weights) / keys / min(costs)) + 5
        for n in range(per_key):
            for k in range(keys):
                queue.push(req(t.name, f"k{k}", cost=next(cost_cycle), at=n), now=n)
    return queue


@settings(max_examples=25, deadline=None)
@given(
    weights=st.lists(st.integers(1, 10), min_size=2, max_size=4),
    costs=st.lists(st.integers(1, 20), min_size=1, max_size=5),
)
def test_tiers_share_service_by_weight_within_5_percent(
    weights: list[int], costs: list[int]
) -> None:
    # Enough service that the SFQ lag bound (one max-cost request per flow) is < 5% of a share.
    goal = 50 * max(costs) * sum(weights) / min(weights)
    queue = backlogged_queue(weights, keys=3, costs=costs, goal=goal)
    served: Counter[str] = Counter()  # cost units
    while sum(served.values()) < goal:
        entry = queue.pop()
        assert entry is not None
        served[entry.request.tier] += int(entry.request.cost)
    total = sum(served.values())
    for i, w in enumerate(weights):
        expected = w / sum(weights)
        assert abs(served[f"t{i}"] / total - expected) <= 0.05 * expected


@settings(max_examples=25, deadline=None)
@given(keys=st.integers(2, 12), costs=st.lists(st.integers(1, 20), min_size=1, max_size=5))
def test_keys_in_a_tier_share_equally_within_5_percent(keys: int, costs: list[int]) -> None:
    goal = 50 * max(costs) * keys
    queue = backlogged_queue([1], keys=keys, costs=costs, goal=goal)
    served: Counter[str] = Counter()  # cost units
    while sum(served.values()) < goal:
        entry = queue.pop()
        assert entry is not None
        served[entry.request.key_id] += int(entry.request.cost)
    total = sum(served.values())
    for k in range(keys):
        assert abs(served[f"k{k}"] / total - 1 / keys) <= 0.05 / keys


@settings(max_examples=60, deadline=None)
@given(
    a_costs=st.lists(st.integers(1, 500), min_size=1, max_size=30),
    b_costs=st.lists(st.integers(1, 500), min_size=1, max_size=30),
    other_keys=st.integers(0, 3),
)
def test_two_backlogged_keys_never_differ_by_more_than_twice_the_largest_cost(
    a_costs: list[int], b_costs: list[int], other_keys: int
) -> None:
    """The virtual-token-counter bound (Sheng et al., "Fairness in serving LLMs"): at every
    point of the service, two keys of one tier that are both backlogged have been served
    tokens within 2 x the largest request's cost of each other, whatever their sizes and
    however many other keys share the tier."""
    queue = WeightedFairQueue([TierConfig("pro", 1, max_wait_s=1e9, max_depth=10**9)])
    rounds = 40
    for n in range(rounds):
        for key, costs in (("a", a_costs), ("b", b_costs)):
            queue.push(req("pro", key, cost=costs[n % len(costs)], at=n), now=0)
        for k in range(other_keys):
            queue.push(req("pro", f"o{k}", cost=250, at=n), now=0)
    largest = max(a_costs + b_costs + ([250] if other_keys else []))
    served: Counter[str] = Counter()
    left = Counter({"a": rounds, "b": rounds})
    while left["a"] and left["b"]:  # both still backlogged
        entry = queue.pop()
        assert entry is not None
        key = entry.request.key_id
        served[key] += int(entry.request.cost)
        left[key] -= 1
        assert abs(served["a"] - served["b"]) <= 2 * largest, (served, largest)


@settings(max_examples=60, deadline=None)
@given(
    a_costs=st.lists(st.integers(1, 500), min_size=1, max_size=20),
    b_costs=st.lists(st.integers(1, 500), min_size=1, max_size=20),
    b_joins_after=st.integers(0, 30),
)
def test_the_bound_holds_over_every_interval_also_for_a_key_that_joins_late(
    a_costs: list[int], b_costs: list[int], b_joins_after: int
) -> None:
    """The same bound over every stretch of the service in which both keys are backlogged,
    not only from the start: `b` arrives after `a` was served alone for a while (it gets no
    credit for that time, and owes none)."""
    queue = WeightedFairQueue([TierConfig("pro", 1, max_wait_s=1e9, max_depth=10**9)])
    rounds = 30
    for n in range(rounds):
        queue.push(req("pro", "a", cost=a_costs[n % len(a_costs)]), now=0)
    alone = [queue.pop() for _ in range(min(b_joins_after, rounds - 1))]
    assert all(e is not None and e.request.key_id == "a" for e in alone)
    for n in range(rounds):
        queue.push(req("pro", "b", cost=b_costs[n % len(b_costs)]), now=0)
    largest = max(a_costs + b_costs)
    gap = [0]  # served to a minus served to b, after each pop while both are backlogged
    left = Counter({"a": rounds - len(alone), "b": rounds})
    while left["a"] and left["b"]:
        entry = queue.pop()
        assert entry is not None
        key, cost = entry.request.key_id, int(entry.request.cost)
        gap.append(gap[-1] + (cost if key == "a" else -cost))
        left[key] -= 1
    # any stretch [i, j]: its service difference is gap[j] - gap[i]
    assert max(gap) - min(gap) <= 2 * largest, (gap, largest)


def test_a_noisy_key_does_not_starve_its_neighbour() -> None:
    queue = WeightedFairQueue([TierConfig("free", 1, max_wait_s=60, max_depth=10_000)])
    for _ in range(1000):
        queue.push(req("free", "noisy"), now=0)
    queue.push(req("free", "quiet"), now=0)
    order = [queue.pop() for _ in range(3)]
    assert "quiet" in [e.request.key_id for e in order if e is not None]


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.integers(1, 1000), min_size=2, max_size=4),
    costs=st.lists(st.integers(1, 10), min_size=1, max_size=4),
)
def test_a_backlogged_tier_is_never_starved(weights: list[int], costs: list[int]) -> None:
    queue = backlogged_queue(weights, keys=2, costs=costs, goal=600 * max(costs))
    last_served: dict[str, int] = {}
    gaps: dict[str, int] = defaultdict(int)
    for n in range(600):
        entry = queue.pop()
        assert entry is not None
        tier = entry.request.tier
        gaps[tier] = max(gaps[tier], n - last_served.get(tier, -1))
        last_served[tier] = n
    ratio = max(costs) / min(costs)
    for i, w in enumerate(weights):
        bound = sum(wj * ratio / w + 1 for wj in weights) + 1
        if bound < 600:
            assert f"t{i}" in last_served
            assert gaps[f"t{i}"] <= bound


def test_an_idle_key_gets_no_credit_for_time_away() -> None:
    queue = WeightedFairQueue([TierConfig("pro", 1, max_wait_s=60, max_depth=10_000)])
    for _ in range(100):
        queue.push(req("pro", "busy"), now=0)
    for _ in range(50):
        assert queue.pop() is not None
    for _ in range(10):
        queue.push(req("pro", "late"), now=1)
    first = [e.request.key_id for e in (queue.pop() for _ in range(10)) if e is not None]
    assert 4 <= first.count("late") <= 6  # shares from now on, no catch-up burst


def test_a_key_that_refills_at_once_cannot_jump_the_line() -> None:
    queue = WeightedFairQueue([TierConfig("pro", 1, max_wait_s=60, max_depth=10_000)])
    for _ in range(30):
        queue.push(req("pro", "backlog"), now=0)
    served: Counter[str] = Counter()  # cost units
    for _ in range(20):
        queue.push(req("pro", "oneatatime", cost=1), now=0)
        entry = queue.pop()
        assert entry is not None
        served[entry.request.key_id] += 1
    # Without the remembered finish tag it would win all 20 pops; with it, it alternates.
    assert served["oneatatime"] <= 11


def test_depth_bound_and_cancel() -> None:
    queue = WeightedFairQueue([TierConfig("free", 1, max_wait_s=60, max_depth=2)])
    a = queue.push(req("free", "k"), now=0)
    b = queue.push(req("free", "k"), now=0)
    assert a is not None and b is not None
    assert queue.push(req("free", "k"), now=0) is None
    assert queue.cancel(a) and not queue.cancel(a)
    assert queue.depth == 1 and queue.tier_depth("free") == 1
    assert queue.push(req("free", "k"), now=0) is not None
    popped = queue.pop()
    assert popped is b
    assert not queue.cancel(b)


@settings(max_examples=50, deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(
            st.floats(0, 5),  # gap before arrival
            st.sampled_from(["a", "b"]),
            st.one_of(st.none(), st.floats(0.01, 20)),  # caller's own timeout
        ),
        min_size=1,
        max_size=40,
    )
)
def test_expired_requests_leave_at_their_deadline(
    arrivals: list[tuple[float, str, float | None]],
) -> None:
    """A driver that only wakes at next_deadline() sheds every request exactly on time."""
    queue = WeightedFairQueue(
        [
            TierConfig("a", 1, max_wait_s=3, max_depth=1000),
            TierConfig("b", 2, max_wait_s=7, max_depth=1000),
        ]
    )
    now = 0.0
    expected: dict[int, float] = {}
    events: list[tuple[float, Entry]] = []
    for gap, tier, timeout in arrivals:
        due = queue.next_deadline()
        while due <= now + gap:
            events.extend((due, e) for e in queue.expire(now=due))
            due = queue.next_deadline()
        now += gap
        deadline = math.inf if timeout is None else now + timeout
        r = req(tier, "k", at=now, deadline_at=deadline)
        queue.push(r, now=now)
        expected[r.id] = min(deadline, now + (3 if tier == "a" else 7))
    while (due := queue.next_deadline()) < math.inf:
        events.extend((due, e) for e in queue.expire(now=due))
    assert queue.depth == 0
    assert sorted(e.request.id for _, e in events) == sorted(expected)
    for at, entry in events:
        assert at == expected[entry.request.id]


def test_bad_tier_config_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"tiers\.free\.weight"):
        TierConfig("free", -1, max_wait_s=1, max_depth=1)
    with pytest.raises(ValueError, match=r"tiers\.free\.max_depth"):
        TierConfig("free", 1, max_wait_s=1, max_depth=0)
    with pytest.raises(ValueError, match=r"tiers\.free\.max_wait_s"):
        TierConfig("free", 1, max_wait_s=0, max_depth=1)
    with pytest.raises(ValueError, match="duplicate"):
        WeightedFairQueue([TierConfig("a", 1, 1, 1), TierConfig("a", 1, 1, 1)])
    queue = WeightedFairQueue([TierConfig("a", 1, 1, 1)])
    with pytest.raises(KeyError, match="nope"):
        queue.push(req("nope", "k"), now=0)
    with pytest.raises(ValueError, match="cost"):
        queue.push(req("a", "k", cost=0), now=0)
