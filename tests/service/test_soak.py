"""A soak in the suite: 3,000 distinct keys through the real processes, in about 45 s.

`bench/soak.py` runs it at 100,000 keys; this is its small twin with the checks as assertions.
The gateway (`scheduler serve`), the demo backend and Redis each run as a process of their own,
so the RSS measured is the gateway's alone. Quota periods of 1-2 s and a 1.5 s cache life let
every TTL pass during the run.
"""

from __future__ import annotations

import pytest

from bench.soak import Sample, SoakPlan, SoakReport, Tally, TtlCheck, run_soak

PLAN = SoakPlan(
    keys=3000,
    passes=3,
    rate_per_s=300.0,
    seconds=30.0,
    concurrency=16,
    sample_every_s=1.0,
    settle_s=5.0,
    periods_s=(1.0, 1.5, 2.0),
    cache_fresh_s=0.5,
    cache_stale_s=1.0,
    max_refused_share=1.0,  # 401s and 503s under a loaded CI box are bench/soak.py's to report
)


@pytest.fixture(scope="module")
def report() -> SoakReport:
    """One run for every test below (run_soak holds its own deadline: `PLAN.deadline_s`)."""
    return run_soak(PLAN)


def test_every_key_is_served_and_every_path_exercised(report: SoakReport) -> None:
    assert report.warmup.unanswered == []
    statuses = report.tally.statuses
    assert statuses[200] > PLAN.keys, report.summary()
    assert statuses[429] > 0  # every 8th key is sent twice in a row
    assert report.outcomes.get("admitted", 0) > PLAN.keys
    assert report.ttl.quota > 0 and report.ttl.cache > 0
    assert len(report.judged) >= 6  # samples after a whole chat pass over the keys


def test_gateway_rss_is_flat_once_every_key_is_known(report: SoakReport) -> None:
    first_mb, last_mb, limit_mb = report.rss_mb()
    assert last_mb - first_mb <= limit_mb, report.summary()
    # per-key memory, bounded by design (entry caps): the registry's cache, filled by the
    # warm-up, and the quota guard's per-key state, filled by the first chat pass
    per_key = (report.warmed.rss_kb - report.baseline.rss_kb) * 1024 / PLAN.keys
    assert per_key < 4096
    assert not report.new_keys_overgrew(), report.summary()


def test_only_the_registered_keys_live_without_a_ttl(report: SoakReport) -> None:
    assert report.ttl.untimed == ()
    assert report.ttl.registry == PLAN.keys + 1  # the meta hashes and the id set
    assert report.ttl.other == 0


def test_redis_keys_stay_bounded_and_fall_back_after_the_traffic(report: SoakReport) -> None:
    assert 0 < report.transient_peak() <= report.transient_bound(), report.summary()
    assert report.drained[-1].dbsize == PLAN.keys + 1
    assert report.drained[-1].at_s <= PLAN.max_ttl_s + 5.0
    assert report.drained[-1].used_memory <= report.baseline.used_memory * 1.5


def test_metric_series_are_bounded_by_the_config_not_the_keys(report: SoakReport) -> None:
    assert report.leaked_labels == ()
    assert report.foreign_labels() == []
    # after warm-up only a first-seen outcome of a bounded enum may add a series
    assert all(s.startswith("scheduler_requests_") for s in report.new_series())
    assert len(set().union(*(s.series for s in report.samples))) < 2 * len(report.baseline.series)
    assert report.failures() == []


def _first_pass(per_visit_b: int, visits: int) -> SoakReport:
    """A report whose first chat pass grew `per_visit_b` per visit over `visits` visits."""

    def at(second: float, done: int) -> Sample:
        rss_kb = 80_000 + (done - 1500) * per_visit_b // 1024
        return Sample(second, done, rss_kb, 0, 0, frozenset())

    start = at(0.0, 0)
    samples = (at(PLAN.settle_s, 1500), at(PLAN.settle_s + 8.0, 1500 + visits))
    ttl = TtlCheck(0, 0, 0, 0, 0, ())
    return SoakReport(PLAN, 0.0, start, Tally(), start, samples, (), Tally(), ttl, (), {})


def test_a_first_pass_is_judged_give_or_take_one_rss_step() -> None:
    # CI, 3,000 keys on a loaded box: 1,061 bytes per visit over ~1,900 visits, ~2 MB in
    # all, two pymalloc arenas: within one step of the limit, not a leak
    assert not _first_pass(1061, 1875).new_keys_overgrew()
    assert _first_pass(1061, 1875).rss_per_new_key() > PLAN.rss_per_key_limit_b
    # twice the limit per key is more than a step over it
    assert _first_pass(2 * PLAN.rss_per_key_limit_b, 1875).new_keys_overgrew()
