"""GatewayMetrics on its own: names, buckets, snapshots, isolation, multiprocess merging,
and the Grafana dashboard's queries against the names that really exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.http.client import BackendBroken, BackendTimeout, BackendUnavailable
from policies.breaker import BreakerState
from scheduler.core import (
    Admit,
    AIMDConfig,
    AIMDController,
    Outcome,
    Request,
    Sample,
    Scheduler,
    SchedulerConfig,
    TierConfig,
)
from scheduler.service.config import load_settings
from scheduler.service.metrics import (
    BASE_BUCKETS_S,
    MULTIPROC_ENV,
    GatewayMetrics,
    RequestOutcome,
    TierTargets,
    backend_error_kind,
    slo_buckets,
)
from scheduler.service.quota import FailMode

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "grafana.json"
TIERS = [TierTargets("enterprise", 30.0, 30.0), TierTargets("free", 8.0, 3.0)]
Key = tuple[str, frozenset[tuple[str, str]]]


def samples(metrics: GatewayMetrics) -> dict[Key, float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, frozenset(labels.items())), 0.0)


def fed() -> GatewayMetrics:
    """An instance that has seen one of everything."""
    metrics = GatewayMetrics.from_settings(load_settings(None, env={}))
    outcomes: tuple[RequestOutcome, ...] = ("admitted", "queued_admitted", "refused_quota")
    for outcome in outcomes:
        metrics.request_done(
            tier="pro",
            route="chat",
            model="demo-small",
            outcome=outcome,
            latency_s=0.5,
            queue_wait_s=0.1,
        )
    metrics.shed("free", "deadline")
    metrics.backend_error("demo-small", "timeout")
    metrics.fail_mode_decision("free", FailMode.OPEN)
    metrics.update_redis(errors_total=2, up=False, breaker=BreakerState.OPEN)
    metrics.update_from(scheduler().statistics())
    return metrics


def scheduler(initial_limit: float = 2.0) -> Scheduler:
    tiers = (TierConfig("enterprise", 8.0, 30.0, 100), TierConfig("free", 1.0, 3.0, 100))
    controller = AIMDController(
        AIMDConfig(initial_limit=initial_limit, target_latency_s=1.0, cooldown_s=0.0)
    )
    return Scheduler(SchedulerConfig(tiers), controller, now=0.0)


def request(n: int, tier: str = "free") -> Request:
    return Request(n, "tenant", tier, "key", "demo-small", 10.0, 0.0)


def test_render_has_every_metric_with_conventional_names() -> None:
    names = {name for name, _ in samples(fed())}
    for name in (
        "scheduler_requests_total",
        "scheduler_shed_total",
        "scheduler_queue_wait_seconds_bucket",
        "scheduler_request_duration_seconds_bucket",
        "scheduler_queue_depth",
        "scheduler_inflight",
        "scheduler_controller_limit",
        "scheduler_controller_latency_seconds",
        "scheduler_controller_pressure",
        "scheduler_controller_congested",
        "scheduler_backend_errors_total",
        "scheduler_redis_errors_total",
        "scheduler_fail_mode_decisions_total",
        "scheduler_redis_up",
        "scheduler_breaker_state",
        "scheduler_tier_fairness_index",
        "scheduler_quota_would_refuse_total",
    ):
        assert name in names, name
    labels = {k for _, pairs in samples(fed()) for k, _ in pairs}
    assert not labels & {"key", "key_id", "api_key", "tenant"}


def test_the_readme_names_every_series_and_its_labels() -> None:
    # the README described the series in prose, naming five of the twenty-seven
    readme = (ROOT / "README.md").read_text()
    table = readme.split("Every series, and how `--workers N` merges", 1)[1].split("\n\n")[1]
    body, _ = fed().render()
    families = list(text_string_to_metric_families(body.decode()))
    assert len(families) > 25
    for family in families:
        if family.name.endswith("_created"):  # prometheus_client's, beside each counter
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        row = next((line for line in table.splitlines() if f"`{name}`" in line), None)
        assert row is not None, name
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        assert all(label in row.split("|")[3] for label in labels), (name, labels, row)


def test_buckets_surround_each_slo_and_max_wait() -> None:
    buckets = GatewayMetrics(TIERS, ["m"]).buckets
    for derived in (0.8, 2.0, 4.0, 8.0, 16.0, 0.3, 0.75, 1.5, 3.0, 6.0, 15.0, 60.0):
        assert derived in buckets
    assert list(buckets) == sorted(set(buckets))
    assert slo_buckets([]) == BASE_BUCKETS_S
    assert slo_buckets([0.7, 0.7]) == tuple(sorted({*BASE_BUCKETS_S, 0.07, 0.175, 0.35, 0.7, 1.4}))
    le = {dict(labels).get("le") for name, labels in samples(GatewayMetrics(TIERS, ["m"]))}
    assert {"8.0", "16.0", "0.3"} <= le


def test_request_done_counts_and_observes_what_it_should() -> None:
    metrics = GatewayMetrics(TIERS, ["m"])

    def done(outcome: RequestOutcome, queue_wait_s: float | None) -> None:
        metrics.request_done(
            tier="free",
            route="chat",
            model="m",
            outcome=outcome,
            latency_s=2.0,
            queue_wait_s=queue_wait_s,
        )

    done("queued_admitted", 1.0)
    done("refused_quota", None)  # neither waited nor served: counted only
    refused = {**common_labels(), "outcome": "refused_quota"}
    assert value(metrics, "scheduler_requests_total", **refused) == 1
    assert value(metrics, "scheduler_queue_wait_seconds_count", tier="free") == 1
    assert (
        value(metrics, "scheduler_request_duration_seconds_count", tier="free", route="chat") == 1
    )
    assert value(metrics, "scheduler_request_duration_seconds_sum", tier="free", route="chat") == 2
    with pytest.raises(ValueError):
        done("sk-secret", None)  # type: ignore[arg-type]


def common_labels() -> dict[str, str]:
    return {"tier": "free", "route": "chat", "model": "m"}


def test_unconfigured_labels_collapse_to_other() -> None:
    metrics = GatewayMetrics(TIERS, ["m"])
    for n in range(5):
        metrics.request_done(
            tier=f"t{n}",
            route=f"r{n}",
            model=f"gpt-{n}",
            outcome="error",
            latency_s=0.0,
            queue_wait_s=None,
        )
        metrics.backend_error(f"gpt-{n}", "bad_gateway")
    labels = {"tier": "other", "route": "other", "model": "other", "outcome": "error"}
    assert value(metrics, "scheduler_requests_total", **labels) == 5
    assert value(metrics, "scheduler_backend_errors_total", model="other", kind="bad_gateway") == 5


def test_meter_reports_once() -> None:
    metrics = GatewayMetrics(TIERS, ["m"])
    meter = metrics.meter(tier="enterprise", route="embeddings", model="m", now=10.0)
    meter.outcome = "queued_admitted"
    meter.queue_wait_s = 0.5
    meter.backend_done(model="m", error=None, now=13.0)  # a stream's last byte
    meter.done(now=99.0)
    meter.fail(now=99.0)
    labels = {"tier": "enterprise", "route": "embeddings"}
    assert value(metrics, "scheduler_request_duration_seconds_sum", **labels) == 3.0
    assert value(metrics, "scheduler_queue_wait_seconds_sum", tier="enterprise") == 0.5
    assert value(metrics, "scheduler_requests_total", **labels, model="m", outcome="error") == 0


def test_meter_failures() -> None:
    metrics = GatewayMetrics(TIERS, ["m"])
    outcomes: list[RequestOutcome] = []
    cases: tuple[tuple[RequestOutcome, str], ...] = (
        ("admitted", "backend"),  # the backend timed out: an error, counted as such
        ("shed_fallback", "raise"),  # the fallback failed: an error
        ("refused_quota", "raise"),  # a refusal raises too, and stays a refusal
        ("error", "raise"),  # cancelled while queued: nothing was decided
    )
    for outcome, how in cases:
        meter = metrics.meter(tier="free", route="chat", model="m", now=0.0)
        meter.outcome = outcome
        if how == "backend":
            meter.backend_done(model="m", error="timeout", now=1.0)
        meter.fail(now=2.0)
        outcomes.append(meter.outcome)
    assert outcomes == ["error", "error", "refused_quota", "error"]
    assert value(metrics, "scheduler_requests_total", **common_labels(), outcome="error") == 3
    assert value(metrics, "scheduler_backend_errors_total", model="m", kind="timeout") == 1
    assert (
        value(metrics, "scheduler_request_duration_seconds_count", tier="free", route="chat") == 0
    )


def test_update_from_sets_gauges_and_counts_new_sheds_once() -> None:
    metrics = GatewayMetrics(TIERS, ["m"])
    core = scheduler(initial_limit=2.0)
    decisions = [core.submit(request(n), now=0.0) for n in range(3)]
    metrics.update_from(core.statistics())
    assert value(metrics, "scheduler_queue_depth", tier="free") == 1
    assert value(metrics, "scheduler_queue_depth", tier="enterprise") == 0
    assert value(metrics, "scheduler_inflight") == 2
    assert value(metrics, "scheduler_controller_limit") == 2
    assert value(metrics, "scheduler_controller_congested") == 0

    for decision in decisions[:2]:
        assert isinstance(decision, Admit)
        core.finish(decision.ticket, Sample(4.0, Outcome.COMPLETED))
    core.tick(now=1.0, pressure=0.3)
    assert len(core.expire(now=5.0)) == 1  # free's max wait is 3 s
    core.drain()
    core.submit(request(9, "enterprise"), now=5.0)
    for _ in range(2):
        metrics.update_from(core.statistics())
    assert value(metrics, "scheduler_controller_latency_seconds") == 4.0
    assert value(metrics, "scheduler_controller_pressure") == 0.3
    assert value(metrics, "scheduler_controller_congested") == 1
    assert value(metrics, "scheduler_controller_limit") == pytest.approx(1.4)
    assert value(metrics, "scheduler_controller_adjustments_total", direction="decrease") == 1
    assert value(metrics, "scheduler_shed_total", tier="free", reason="deadline") == 1
    assert value(metrics, "scheduler_shed_total", tier="enterprise", reason="draining") == 1
    assert value(metrics, "scheduler_inflight") == 0


def test_redis_breaker_fail_mode_and_backend_errors() -> None:
    metrics = GatewayMetrics(TIERS, ["m"])
    metrics.update_redis(errors_total=3, up=True, breaker=BreakerState.HALF_OPEN)
    metrics.update_redis(errors_total=5, up=False, breaker=BreakerState.OPEN)
    assert value(metrics, "scheduler_redis_errors_total") == 5
    assert value(metrics, "scheduler_redis_up") == 0
    assert value(metrics, "scheduler_breaker_state") == 2
    metrics.fail_mode_decision("free", FailMode.CLOSED)
    assert value(metrics, "scheduler_fail_mode_decisions_total", tier="free", mode="closed") == 1
    assert value(metrics, "scheduler_fail_mode_decisions_total", tier="free", mode="open") == 0
    assert backend_error_kind(BackendTimeout()) == "timeout"
    assert backend_error_kind(BackendUnavailable()) == "unavailable"
    assert backend_error_kind(BackendBroken()) == "bad_gateway"
    assert backend_error_kind(status=429) == backend_error_kind(status=503) == "saturated"
    assert backend_error_kind(status=500) == "bad_gateway"
    assert backend_error_kind(status=404) is None
    assert backend_error_kind(status=200) is None


def test_two_instances_share_nothing() -> None:
    one, two = GatewayMetrics(TIERS, ["m"]), GatewayMetrics(TIERS, ["m"])
    one.request_done(
        tier="free", route="chat", model="m", outcome="admitted", latency_s=1, queue_wait_s=0
    )
    one.update_redis(errors_total=1, up=True, breaker=BreakerState.CLOSED)
    labels = {**common_labels(), "outcome": "admitted"}
    assert value(one, "scheduler_requests_total", **labels) == 1
    assert value(two, "scheduler_requests_total", **labels) == 0
    assert value(two, "scheduler_redis_errors_total") == 0
    assert value(two, "scheduler_redis_up") == 0


def test_refuses_multiprocess_dir_set_too_late(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="before the worker processes start"):
        GatewayMetrics(TIERS, ["m"])


WORKER = """
import sys
from scheduler.core import FixedController, Request, Scheduler, SchedulerConfig, TierConfig
from scheduler.service.metrics import GatewayMetrics, TierTargets

requests, inflight, close = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "close"
metrics = GatewayMetrics([TierTargets("free", 10.0, 5.0)], ["m"])
for _ in range(requests):
    metrics.request_done(
        tier="free", route="chat", model="m", outcome="admitted", latency_s=0.2, queue_wait_s=0.0
    )
core = Scheduler(
    SchedulerConfig((TierConfig("free", 1.0, 5.0, 10),)), FixedController(50.0), now=0.0
)
for n in range(inflight):
    core.submit(Request(n, "t", "free", "k", "m", 1.0, 0.0), now=0.0)
metrics.update_from(core.statistics())
if close:
    metrics.close()
else:
    sys.stdout.buffer.write(metrics.render()[0])
"""


def test_multiprocess_mode_merges_every_worker(tmp_path: Path) -> None:
    env = {**os.environ, MULTIPROC_ENV: str(tmp_path), "PYTHONPATH": str(ROOT)}

    def worker(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(WORKER), *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout

    worker("4", "3", "keep")
    worker("2", "7", "close")  # a worker that has left: its live gauges are gone
    body = worker("1", "5", "keep")  # renders all three

    merged = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    labels = frozenset({**common_labels(), "outcome": "admitted"}.items())
    assert merged[("scheduler_requests_total", labels)] == 7
    assert merged[("scheduler_inflight", frozenset())] == 3 + 5
    assert merged[("scheduler_controller_limit", frozenset())] == 100
    assert merged[("scheduler_tier_slo_seconds", frozenset({("tier", "free")}))] == 10


def dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(json.loads(DASHBOARD.read_text()))
    return exprs


def test_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    exported = {name for name, _ in samples(fed())}
    used = {name for expr in exprs for name in re.findall(r"\bscheduler_[a-z0-9_]+", expr)}
    assert used, "no scheduler_* metric in the dashboard"
    assert used - exported == set()
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]


def test_each_tier_shows_its_fairness_index_over_its_window() -> None:
    metrics = GatewayMetrics(TIERS, ["demo-small"])
    for t in range(10):
        metrics.queue_decided("free", "a", cost=10, admitted=True, now=t)
        metrics.queue_decided("free", "b", cost=10, admitted=t % 2 == 0, now=t)
    metrics.queue_decided("unknown", "a", cost=10, admitted=False, now=9.0)  # not a tier here
    metrics.update_fairness(now=10.0)
    # a got 100 and b 50 of 150, fair shares 75 each: ratios 4/3 and 2/3, Jain's 0.9
    assert value(metrics, "scheduler_tier_fairness_index", tier="free") == pytest.approx(0.9)
    assert value(metrics, "scheduler_tier_fairness_keys", tier="free") == 2
    assert value(metrics, "scheduler_tier_fairness_index", tier="enterprise") == 1.0
    assert value(metrics, "scheduler_tier_fairness_keys", tier="enterprise") == 0
    metrics.update_fairness(now=100.0)  # the window has passed: nothing left to be unfair
    assert value(metrics, "scheduler_tier_fairness_index", tier="free") == 1.0


def test_each_priority_band_below_the_top_shows_its_ceiling() -> None:
    tiers = (
        TierConfig("enterprise", 8, 30, 50, priority=2, protect_latency_s=1.0),
        TierConfig("pro", 3, 30, 50, priority=1),
        TierConfig("free", 1, 30, 50),
    )
    core = Scheduler(SchedulerConfig(tiers), AIMDController(AIMDConfig(initial_limit=10)), now=0)
    metrics = GatewayMetrics(TIERS, ["m"])
    metrics.update_from(core.statistics())
    assert value(metrics, "scheduler_band_ceiling_slots", band="1") == 10.0  # the window
    assert value(metrics, "scheduler_band_ceiling_slots", band="2") == 10.0
    assert ("scheduler_band_ceiling_slots", frozenset({("band", "0")})) not in samples(metrics)
    # a protected call past its target cuts the ceilings below it
    ticket = core.submit(Request(1, "k", "enterprise", "k", "m", 1.0, 0.0), now=0.0)
    assert isinstance(ticket, Admit)
    core.finish(ticket.ticket, Sample(2.0))
    core.tick(now=2.0, pressure=0.0)
    metrics.update_from(core.statistics())
    assert value(metrics, "scheduler_band_ceiling_slots", band="1") == pytest.approx(7.0)
    assert value(metrics, "scheduler_band_ceiling_slots", band="2") == pytest.approx(7.0)
