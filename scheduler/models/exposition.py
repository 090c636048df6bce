"""Prometheus text from vLLM, SGLang, TGI, llama.cpp, Triton and DCGM, read into a `Scrape`
(pure: no I/O).

Each engine's names, where they are defined, and how their label sets are combined:

    vLLM     vllm/v1/metrics/loggers.py (PrometheusStatLogger), labels model_name and engine
             vllm:num_requests_waiting        summed over engines: the server's whole queue
             vllm:num_requests_running        summed
             vllm:kv_cache_usage_perc         max over engines (0..1 despite the name)
             vllm:gpu_cache_usage_perc        the same; its name before v1 (0.9 renamed it),
                                              read only when the current one is absent
             vllm:num_preemptions_total       summed (a counter; the model turns it into a rate)
    SGLang   python/sglang/srt/metrics/collector.py (SchedulerMetricsCollector), labels
             model_name, engine_type, tp_rank, pp_rank, moe_ep_rank and, with data
             parallelism, dp_rank (python/sglang/srt/managers/scheduler.py)
             sglang:num_queue_reqs            waiting
             sglang:num_running_reqs          running
             sglang:token_usage               KV cache: tokens held / the KV pool's tokens (0..1)
             sglang:num_retracted_requests_total  preemptions (SGLang retracts a running
                                              request when the KV pool runs out)
             A queue belongs to a DP rank: with --enable-metrics-for-all-schedulers every
             TP/PP/EP rank of it repeats the same numbers, so each label set less those three
             ranks counts once (the max), and those are summed
    TGI      backends/v3/src/queue.rs and backend.rs (router/src/server.rs describes them)
             tgi_queue_size                   waiting (requests not yet in a batch)
             tgi_batch_current_size           running; TGI exports no KV-cache usage
    llama    tools/server/server-task.cpp (server_task_result_metrics::to_metrics), in the
    .cpp     tree vendored by llama-cpp-python 0.3.36; `--metrics` needed
             llamacpp:requests_deferred       waiting (tasks no free slot could take)
             llamacpp:requests_processing     running (busy slots)
             No KV-cache usage (older llama.cpp had one; this one does not). With an explicit
             `--parallel N` each slot owns ctx_size / N tokens of the KV cache
             (tools/server/server-context.cpp: no unified cache unless `--kv-unified`), so
             one request cannot take another's cache: the slots are the capacity, and a
             deferred request is what a full cache would be elsewhere
    Triton   core src/metrics.cc (the families; GPU gauges labelled gpu_uuid) and
             src/metric_model_reporter.cc (per-model labels model and version)
             nv_inference_pending_request_count         summed over models, added to waiting
             nv_gpu_memory_used_bytes / nv_gpu_memory_total_bytes   per GPU, paired by labels
    DCGM     dcgm-exporter etc/default-counters.csv, labels gpu, UUID, pci_bus_id, device,
             modelName, Hostname
             DCGM_FI_DEV_FB_USED / (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE)   per GPU (MiB)

Across the chosen exporters, waiting, running and preemptions add up and the KV cache is the
fullest. GPU memory is the fullest GPU's fraction: one full GPU stalls a tensor-parallel group
however empty the others are. A used/total pair is matched by its exact label set (both
exporters label a GPU's series alike). NaN samples are ignored and negative ones read as 0.
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict
from collections.abc import Callable, Iterable

from prometheus_client.parser import text_string_to_metric_families

from scheduler.models.pressure import Scrape


class Exporter(enum.Enum):
    """A family of metrics the parser understands."""

    VLLM = "vllm"
    SGLANG = "sglang"
    TGI = "tgi"
    LLAMACPP = "llamacpp"
    TRITON = "triton"
    DCGM = "dcgm"


ALL_EXPORTERS: frozenset[Exporter] = frozenset(Exporter)

VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"
VLLM_KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"
VLLM_PREEMPTIONS = "vllm:num_preemptions_total"
SGLANG_WAITING = "sglang:num_queue_reqs"
SGLANG_RUNNING = "sglang:num_running_reqs"
SGLANG_KV_USAGE = "sglang:token_usage"
SGLANG_RETRACTIONS = "sglang:num_retracted_requests_total"
TGI_WAITING = "tgi_queue_size"
TGI_RUNNING = "tgi_batch_current_size"
LLAMACPP_DEFERRED = "llamacpp:requests_deferred"
LLAMACPP_PROCESSING = "llamacpp:requests_processing"
TRITON_PENDING = "nv_inference_pending_request_count"
TRITON_MEMORY_USED = "nv_gpu_memory_used_bytes"
TRITON_MEMORY_TOTAL = "nv_gpu_memory_total_bytes"
DCGM_FB_USED = "DCGM_FI_DEV_FB_USED"
DCGM_FB_FREE = "DCGM_FI_DEV_FB_FREE"

LabelSet = frozenset[tuple[str, str]]
Series = dict[LabelSet, float]  # one metric's samples by label set
Reduce = Callable[[Series], float]  # one engine's label sets into one number
Source = tuple[tuple[str, ...], Reduce]  # names (the first one present is read), reduce


def _total(series: Series) -> float:
    return math.fsum(series.values())


def _fullest(series: Series) -> float:
    return max(series.values())


_SGLANG_REPEATING_RANKS = frozenset({"tp_rank", "pp_rank", "moe_ep_rank"})


def _per_queue(series: Series) -> float:
    """SGLang: the ranks that repeat one DP rank's numbers count once."""
    queues: dict[LabelSet, float] = {}
    for labels, value in series.items():
        queue = frozenset(item for item in labels if item[0] not in _SGLANG_REPEATING_RANKS)
        queues[queue] = max(value, queues.get(queue, 0.0))
    return math.fsum(queues.values())


_WAITING: dict[Exporter, Source] = {
    Exporter.VLLM: ((VLLM_WAITING,), _total),
    Exporter.SGLANG: ((SGLANG_WAITING,), _per_queue),
    Exporter.TGI: ((TGI_WAITING,), _total),
    Exporter.LLAMACPP: ((LLAMACPP_DEFERRED,), _total),
    Exporter.TRITON: ((TRITON_PENDING,), _total),
}
_RUNNING: dict[Exporter, Source] = {
    Exporter.VLLM: ((VLLM_RUNNING,), _total),
    Exporter.SGLANG: ((SGLANG_RUNNING,), _per_queue),
    Exporter.TGI: ((TGI_RUNNING,), _total),
    Exporter.LLAMACPP: ((LLAMACPP_PROCESSING,), _total),
}
_KV_USAGE: dict[Exporter, Source] = {
    Exporter.VLLM: ((VLLM_KV_USAGE, VLLM_KV_USAGE_OLD), _fullest),
    Exporter.SGLANG: ((SGLANG_KV_USAGE,), _fullest),
}
_PREEMPTIONS: dict[Exporter, Source] = {
    Exporter.VLLM: ((VLLM_PREEMPTIONS,), _total),
    Exporter.SGLANG: ((SGLANG_RETRACTIONS,), _per_queue),
}
_MEMORY: dict[Exporter, tuple[str, ...]] = {
    Exporter.TRITON: (TRITON_MEMORY_USED, TRITON_MEMORY_TOTAL),
    Exporter.DCGM: (DCGM_FB_USED, DCGM_FB_FREE),
}


def metric_names(exporters: Iterable[Exporter]) -> frozenset[str]:
    """Every metric name the chosen exporters read."""
    chosen = set(exporters)
    names: set[str] = set()
    for table in (_WAITING, _RUNNING, _KV_USAGE, _PREEMPTIONS):
        names.update(name for e, (ns, _) in table.items() if e in chosen for name in ns)
    names.update(name for e, ns in _MEMORY.items() if e in chosen for name in ns)
    return frozenset(names)


def read_series(text: str, names: Iterable[str]) -> dict[str, Series]:
    """The samples of the named metrics, by name and label set. Raises ValueError when the
    text is not Prometheus' text format."""
    wanted = set(names)
    found: dict[str, Series] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and not math.isnan(sample.value):
                found[sample.name][frozenset(sample.labels.items())] = max(0.0, sample.value)
    return found


def _read(
    found: dict[str, Series],
    table: dict[Exporter, Source],
    exporters: frozenset[Exporter],
    combine: Callable[[list[float]], float],
) -> float | None:
    """One field of the scrape: each chosen exporter's number, combined across exporters."""
    values = []
    for exporter, (names, reduce) in table.items():
        if exporter in exporters:
            series = next((found[n] for n in names if found.get(n)), None)
            values.extend([reduce(series)] if series else [])
    return combine(values) if values else None


def _fractions(used: Series | None, total: Series | None, *, total_adds_used: bool) -> list[float]:
    """used / total per GPU (or used / (used + free) when `total_adds_used`)."""
    if not used or not total:
        return []
    fractions = []
    for labels, used_value in used.items():
        other = total.get(labels)
        if other is None:
            continue
        whole = used_value + other if total_adds_used else other
        fraction = used_value / whole if whole > 0 else math.nan
        if not math.isnan(fraction):  # no total, or inf / inf
            fractions.append(min(1.0, fraction))
    return fractions


def parse_scrape(text: str, *, at: float, exporters: frozenset[Exporter] = ALL_EXPORTERS) -> Scrape:
    """Read the metrics of the chosen `exporters` out of Prometheus text taken at `at`.
    Raises ValueError when the text is not Prometheus' text format."""
    s = read_series(text, metric_names(exporters))
    memory = [
        *_fractions(s.get(TRITON_MEMORY_USED), s.get(TRITON_MEMORY_TOTAL), total_adds_used=False),
        *_fractions(s.get(DCGM_FB_USED), s.get(DCGM_FB_FREE), total_adds_used=True),
    ]
    return Scrape(
        at=at,
        kv_usage=_read(s, _KV_USAGE, exporters, max),
        waiting=_read(s, _WAITING, exporters, math.fsum),
        running=_read(s, _RUNNING, exporters, math.fsum),
        gpu_memory=max(memory, default=None),
        preemptions_total=_read(s, _PREEMPTIONS, exporters, math.fsum),
    )
