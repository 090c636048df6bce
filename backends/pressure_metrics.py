"""Prometheus text from vLLM, llama.cpp, Triton and DCGM, read into a `Scrape` (pure: no I/O).

The metric names, and how their label sets (several models, engines, GPUs) are combined:

    vLLM    vllm:num_requests_waiting        summed: the server's whole queue
            vllm:num_requests_running        summed
            vllm:kv_cache_usage_perc         max over engines (0..1 despite the name)
            vllm:gpu_cache_usage_perc        the same, older name; used when the new one is absent
            vllm:num_preemptions_total       summed (a counter; the model turns it into a rate)
    llama   llamacpp:requests_deferred       added to waiting (tasks no free slot could take)
    .cpp    llamacpp:requests_processing     added to running (busy slots); `--metrics` needed
            no KV-cache usage: the llama.cpp we test against (llama-cpp-python 0.3.36's) exports
            none (names read from the running server: tests/backends/test_llama_server.py)
    Triton  nv_inference_pending_request_count         summed over models, added to waiting
            nv_gpu_memory_used_bytes / nv_gpu_memory_total_bytes   per GPU, paired by labels
    DCGM    DCGM_FI_DEV_FB_USED / (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE)   per GPU (MiB)

GPU memory is the fullest GPU's fraction: one full GPU stalls a tensor-parallel group however
empty the others are. A used/total pair is matched by its exact label set (both exporters
label a GPU's series alike). NaN samples are ignored and negative ones read as 0.
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

from backends.pressure_model import Scrape


class Exporter(enum.Enum):
    """A family of metrics the parser understands."""

    VLLM = "vllm"
    LLAMACPP = "llamacpp"
    TRITON = "triton"
    DCGM = "dcgm"


ALL_EXPORTERS: frozenset[Exporter] = frozenset(Exporter)

VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"
VLLM_KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"
VLLM_PREEMPTIONS = "vllm:num_preemptions_total"
LLAMACPP_DEFERRED = "llamacpp:requests_deferred"
LLAMACPP_PROCESSING = "llamacpp:requests_processing"
TRITON_PENDING = "nv_inference_pending_request_count"
TRITON_MEMORY_USED = "nv_gpu_memory_used_bytes"
TRITON_MEMORY_TOTAL = "nv_gpu_memory_total_bytes"
DCGM_FB_USED = "DCGM_FI_DEV_FB_USED"
DCGM_FB_FREE = "DCGM_FI_DEV_FB_FREE"

_NAMES = {
    Exporter.VLLM: (VLLM_WAITING, VLLM_RUNNING, VLLM_KV_USAGE, VLLM_KV_USAGE_OLD, VLLM_PREEMPTIONS),
    Exporter.LLAMACPP: (LLAMACPP_DEFERRED, LLAMACPP_PROCESSING),
    Exporter.TRITON: (TRITON_PENDING, TRITON_MEMORY_USED, TRITON_MEMORY_TOTAL),
    Exporter.DCGM: (DCGM_FB_USED, DCGM_FB_FREE),
}

LabelSet = frozenset[tuple[str, str]]
Series = dict[LabelSet, float]  # one metric's samples by label set


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


def _sum(series: Series | None) -> float | None:
    return None if not series else math.fsum(series.values())


def _max(series: Series | None) -> float | None:
    return None if not series else max(series.values())


def _add(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else a + b


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
    names = [name for exporter in exporters for name in _NAMES[exporter]]
    s = read_series(text, names)
    kv_usage = (
        _max(s.get(VLLM_KV_USAGE)) if s.get(VLLM_KV_USAGE) else _max(s.get(VLLM_KV_USAGE_OLD))
    )
    memory = [
        *_fractions(s.get(TRITON_MEMORY_USED), s.get(TRITON_MEMORY_TOTAL), total_adds_used=False),
        *_fractions(s.get(DCGM_FB_USED), s.get(DCGM_FB_FREE), total_adds_used=True),
    ]
    return Scrape(
        at=at,
        kv_usage=kv_usage,
        waiting=_add(
            _add(_sum(s.get(VLLM_WAITING)), _sum(s.get(LLAMACPP_DEFERRED))),
            _sum(s.get(TRITON_PENDING)),
        ),
        running=_add(_sum(s.get(VLLM_RUNNING)), _sum(s.get(LLAMACPP_PROCESSING))),
        gpu_memory=max(memory, default=None),
        preemptions_total=_sum(s.get(VLLM_PREEMPTIONS)),
    )
