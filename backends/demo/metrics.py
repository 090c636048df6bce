"""The demo server's Prometheus metrics, under vLLM's names and `model_name` label.

Gauges are read from the engine's statistics at scrape time (nothing to update per request);
histograms and counters are fed when a request ends. Each app has its own registry, so several
demo servers can live in one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backends.demo.engine import Ticket, TicketState
from scheduler.models.gpu import GpuStats

# vLLM's bucket boundaries
TTFT_BUCKETS: tuple[float, ...] = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0),
    *(7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
E2E_BUCKETS: tuple[float, ...] = (
    *(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0),
    *(120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
)


class _GpuGauges(Collector):
    def __init__(self, model_name: str, stats: Callable[[], GpuStats]) -> None:
        self._model_name = model_name
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        values = (
            ("vllm:num_requests_running", "Requests in the model batch.", stats.running),
            ("vllm:num_requests_waiting", "Requests waiting for a batch slot.", stats.waiting_seen),
            ("vllm:kv_cache_usage_perc", "KV-cache usage, 1 means full.", stats.kv_usage),
            ("vllm:gpu_cache_usage_perc", "KV-cache usage (older name).", stats.kv_usage),
        )
        for name, doc, value in values:
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric([self._model_name], value)
            yield gauge


class DemoMetrics:
    def __init__(self, model_name: str, stats: Callable[[], GpuStats]) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        reg = self.registry
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=reg,
        ).labels(model_name)
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end latency of finished requests.",
            labels,
            buckets=E2E_BUCKETS,
            registry=reg,
        ).labels(model_name)
        self._prompt = Counter(
            "vllm:prompt_tokens", "Prefilled prompt tokens.", labels, registry=reg
        ).labels(model_name)
        self._generation = Counter(
            "vllm:generation_tokens", "Generated tokens.", labels, registry=reg
        ).labels(model_name)
        Counter("vllm:num_preemptions", "Preemptions (never).", labels, registry=reg).labels(
            model_name
        )
        self.registry.register(_GpuGauges(model_name, stats))

    def observe_ended(self, ticket: Ticket) -> None:
        seq = ticket.seq
        if seq is None:
            return
        if not math.isnan(seq.first_token_at):
            self._ttft.observe(seq.first_token_at - seq.submitted_at)
            self._prompt.inc(seq.prompt_tokens)
        self._generation.inc(ticket.tokens_ready)
        if ticket.state is TicketState.FINISHED:
            self._e2e.observe(seq.finished_at - seq.submitted_at)

    def render(self) -> bytes:
        return generate_latest(self.registry)
