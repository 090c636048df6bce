"""GPU-pressure probes: canned vLLM, SGLang, TGI, llama.cpp, Triton and DCGM scrapes read with
explicit times, the model's signals and staleness, config from TOML tables, pools, and probes
through real sockets against the demo GPU server (conditions waited for under a deadline,
never slept for).

Each canned scrape is written as its engine writes it: the names and help texts of the source
cited in scheduler/models/exposition.py, its label sets, and its exporter library's layout
(prometheus_client for vLLM and SGLang, with `_total` counters and their `_created` series;
the Rust metrics-exporter-prometheus for TGI, counters without `_total`, a blank line between
families; llama.cpp's own `to_metrics()`).
"""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from backends.demo.server import DemoConfig, serve_demo_backend
from backends.http.client import BackendLimits, HttpClient
from backends.probes.metrics import (
    Aggregate,
    MetricsProbe,
    ModelProbe,
    PoolPressure,
    PressureReading,
    ScrapeError,
)
from backends.probes.nvml import NvmlProbe, NvmlUnavailable
from scheduler.models.exposition import Exporter, parse_scrape
from scheduler.models.gpu import GpuConfig
from scheduler.models.pressure import PressureConfig, PressureModel, Scrape, Signal
from scheduler.models.pressure_config import ProbeConfig, probe_config_from_mapping

LLAMA = 'model_name="meta-llama/Llama-3.1-8B-Instruct"'

VLLM_V1 = f"""\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",{LLAMA}}} 24.0
vllm:num_requests_running{{engine="1",{LLAMA}}} 31.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",{LLAMA}}} 2.0
vllm:num_requests_waiting{{engine="1",{LLAMA}}} 3.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: \
Use vllm:kv_cache_usage_perc instead.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{{engine="0",{LLAMA}}} 0.42
vllm:gpu_cache_usage_perc{{engine="1",{LLAMA}}} 0.61
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",{LLAMA}}} 0.42
vllm:kv_cache_usage_perc{{engine="1",{LLAMA}}} 0.61
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{{engine="0",{LLAMA}}} 10.0
vllm:num_preemptions_total{{engine="1",{LLAMA}}} 5.0
# HELP vllm:num_preemptions_created Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_created gauge
vllm:num_preemptions_created{{engine="0",{LLAMA}}} 1.7962520320320742e+09
vllm:num_preemptions_created{{engine="1",{LLAMA}}} 1.7962520320321019e+09
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.1",{LLAMA}}} 7.0
vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",{LLAMA}}} 9.0
vllm:time_to_first_token_seconds_count{{engine="0",{LLAMA}}} 9.0
vllm:time_to_first_token_seconds_sum{{engine="0",{LLAMA}}} 0.8
"""

VLLM_V0 = f"""\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{{LLAMA}}} 48.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{{{LLAMA}}} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{{LLAMA}}} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{{{LLAMA}}} 0.93
# HELP vllm:cpu_cache_usage_perc CPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:cpu_cache_usage_perc gauge
vllm:cpu_cache_usage_perc{{{LLAMA}}} 0.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{{{LLAMA}}} 3.0
"""


def sglang_ranks(dp: int, tp: int) -> str:
    return (
        f'dp_rank="{dp}",engine_type="unified",{LLAMA},moe_ep_rank="0",pp_rank="0",tp_rank="{tp}"'
    )


# Two DP ranks of two TP ranks each, every scheduler reporting
# (--enable-metrics-for-all-schedulers): a DP rank's TP ranks repeat its numbers.
SGLANG = "".join(
    f"""\
# HELP sglang:{name} {help_text}
# TYPE sglang:{name} {kind}
sglang:{name}{{{sglang_ranks(0, 0)}}} {first}
sglang:{name}{{{sglang_ranks(0, 1)}}} {first}
sglang:{name}{{{sglang_ranks(1, 2)}}} {second}
sglang:{name}{{{sglang_ranks(1, 3)}}} {second}
"""
    for name, help_text, kind, first, second in [
        ("num_running_reqs", "The number of running requests.", "gauge", "12.0", "9.0"),
        ("token_usage", "The token usage.", "gauge", "0.57", "0.83"),
        ("num_queue_reqs", "The number of requests in the waiting queue.", "gauge", "4.0", "1.0"),
        ("cache_hit_rate", "The prefix cache hit rate.", "gauge", "0.31", "0.29"),
        (
            "num_retracted_requests_total",
            "Total number of retracted requests.",
            "counter",
            "6.0",
            "2.0",
        ),
    ]
)

TGI = """\
# HELP tgi_request_count Total number of requests
# TYPE tgi_request_count counter
tgi_request_count 1031

# HELP tgi_batch_inference_count Inference calls per method (prefill or decode)
# TYPE tgi_batch_inference_count counter
tgi_batch_inference_count{method="prefill"} 212
tgi_batch_inference_count{method="decode"} 20913

# HELP tgi_batch_current_size Current batch size
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 27

# HELP tgi_queue_size Current queue size
# TYPE tgi_queue_size gauge
tgi_queue_size 5

# HELP tgi_batch_current_max_tokens Maximum tokens for the current batch
# TYPE tgi_batch_current_max_tokens gauge
tgi_batch_current_max_tokens 41210

# HELP tgi_request_queue_duration Time spent in the queue per request
# TYPE tgi_request_queue_duration histogram
tgi_request_queue_duration_bucket{le="0.00015"} 12
tgi_request_queue_duration_bucket{le="0.000225"} 40
tgi_request_queue_duration_bucket{le="+Inf"} 1031
tgi_request_queue_duration_sum 96.2
tgi_request_queue_duration_count 1031

"""

# As tools/server/server-task.cpp's to_metrics() writes it (counters, then gauges).
LLAMA_CPP = "".join(
    f"# HELP llamacpp:{name} {help_text}\n# TYPE llamacpp:{name} {kind}\nllamacpp:{name} {value}\n"
    for name, help_text, kind, value in [
        (
            "prompt_tokens_total",
            "Number of prompt tokens processed, excluding cached tokens",
            "counter",
            "3412",
        ),
        ("prompt_seconds_total", "Total time spent processing prompts", "counter", "4.1705"),
        ("tokens_predicted_total", "Number of generation tokens processed", "counter", "9921"),
        (
            "n_decode_total",
            "Total number of llama_decode() calls, excluding speculative "
            "decoding and multimodal decoding",
            "counter",
            "5120",
        ),
        (
            "n_tokens_max",
            "Largest observed sequence length (prompt + generation)",
            "counter",
            "3041",
        ),
        ("prompt_tokens_seconds", "Average prompt throughput in tokens/s", "gauge", "818.2"),
        ("predicted_tokens_seconds", "Average generation throughput in tokens/s", "gauge", "61.75"),
        ("requests_processing", "Number of requests processing", "gauge", "2"),
        ("requests_deferred", "Number of requests deferred", "gauge", "3"),
        (
            "n_busy_slots_per_decode",
            "Average number of busy slots per llama_decode() call",
            "gauge",
            "1.9375",
        ),
    ]
)


TRITON = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="resnet50",version="1"} 1204
nv_inference_request_success{model="bert-large",version="2"} 388
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting \
execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="resnet50",version="1"} 4
nv_inference_pending_request_count{model="bert-large",version="2"} 2
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-8f6f3b2a-5e1c-4d0e-9a1b-2c3d4e5f6a7b"} 0.51
nv_gpu_utilization{gpu_uuid="GPU-1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d"} 0.97
# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{gpu_uuid="GPU-8f6f3b2a-5e1c-4d0e-9a1b-2c3d4e5f6a7b"} 85899345920
nv_gpu_memory_total_bytes{gpu_uuid="GPU-1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d"} 85899345920
# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{gpu_uuid="GPU-8f6f3b2a-5e1c-4d0e-9a1b-2c3d4e5f6a7b"} 21474836480
nv_gpu_memory_used_bytes{gpu_uuid="GPU-1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d"} 64424509440
"""


def dcgm_gpu(gpu: int, uuid: str, bus: str) -> str:
    return (
        f'gpu="{gpu}",UUID="{uuid}",pci_bus_id="{bus}",device="nvidia{gpu}",'
        'modelName="NVIDIA A100-SXM4-80GB",Hostname="gpu-node-1",'
        'DCGM_FI_DRIVER_VERSION="550.54.15"'
    )


GPU0 = dcgm_gpu(0, "GPU-0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e", "00000000:07:00.0")
GPU1 = dcgm_gpu(1, "GPU-9e8d7c6b-5a4f-3e2d-1c0b-a9f8e7d6c5b4", "00000000:0F:00.0")
DCGM = f"""\
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{{{GPU0}}} 34
DCGM_FI_DEV_GPU_UTIL{{{GPU1}}} 100
# HELP DCGM_FI_DEV_FB_FREE Framebuffer memory free (in MiB).
# TYPE DCGM_FI_DEV_FB_FREE gauge
DCGM_FI_DEV_FB_FREE{{{GPU0}}} 61440
DCGM_FI_DEV_FB_FREE{{{GPU1}}} 8192
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{{{GPU0}}} 20480
DCGM_FI_DEV_FB_USED{{{GPU1}}} 73728
"""

NODE_EXPORTER = """\
# HELP node_load1 1m load average.
# TYPE node_load1 gauge
node_load1 0.42
"""


# --- reading the exporters' text ---------------------------------------------------------


def test_vllm_sums_queues_and_takes_the_fullest_engine() -> None:
    assert parse_scrape(VLLM_V1, at=5.0) == Scrape(
        at=5.0, kv_usage=0.61, waiting=5.0, running=55.0, preemptions_total=15.0
    )


def test_older_vllm_kv_cache_name() -> None:
    scrape = parse_scrape(VLLM_V0, at=0.0)
    assert (scrape.kv_usage, scrape.waiting, scrape.running) == (0.93, 0.0, 48.0)
    assert scrape.preemptions_total == 3.0


def test_the_current_kv_name_wins_when_both_are_exposed() -> None:
    both = VLLM_V1 + f"vllm:gpu_cache_usage_perc{{{LLAMA}}} 0.99\n"
    assert parse_scrape(both, at=0.0).kv_usage == 0.61


def test_sglang_counts_each_dp_rank_once_and_takes_the_fullest_kv_pool() -> None:
    scrape = parse_scrape(SGLANG, at=2.0)
    assert scrape == Scrape(at=2.0, kv_usage=0.83, waiting=5.0, running=21.0, preemptions_total=8.0)


def test_tgi_queue_and_batch() -> None:
    assert parse_scrape(TGI, at=3.0) == Scrape(at=3.0, waiting=5.0, running=27.0)


def test_llama_cpp_deferred_requests_wait_and_busy_slots_run() -> None:
    assert parse_scrape(LLAMA_CPP, at=4.0) == Scrape(at=4.0, waiting=3.0, running=2.0)


def test_engines_behind_one_url_add_their_queues() -> None:
    # A scrape that holds several engines' families (a shared exporter): queues add up,
    # the fullest KV cache counts.
    scrape = parse_scrape(VLLM_V1 + SGLANG + TGI + LLAMA_CPP, at=0.0)
    assert (scrape.waiting, scrape.running, scrape.kv_usage) == (18.0, 105.0, 0.83)
    assert scrape.preemptions_total == 23.0


def test_triton_pending_requests_and_the_fullest_gpu() -> None:
    scrape = parse_scrape(TRITON, at=1.0)
    assert scrape == Scrape(at=1.0, waiting=6.0, gpu_memory=0.75)


def test_dcgm_memory_is_used_over_used_plus_free_on_the_fullest_gpu() -> None:
    scrape = parse_scrape(DCGM, at=1.0)
    assert scrape == Scrape(at=1.0, gpu_memory=0.9)


def test_exporters_choose_which_families_are_read() -> None:
    assert not parse_scrape(DCGM, at=0.0, exporters=frozenset({Exporter.VLLM})).known
    tgi_only = parse_scrape(SGLANG + TGI, at=0.0, exporters=frozenset({Exporter.TGI}))
    assert (tgi_only.waiting, tgi_only.kv_usage) == (5.0, None)
    both = parse_scrape(VLLM_V1 + DCGM, at=0.0, exporters=frozenset({Exporter.DCGM}))
    assert (both.kv_usage, both.gpu_memory) == (None, 0.9)


def test_nan_is_ignored_and_negative_reads_as_zero() -> None:
    text = (
        f"vllm:kv_cache_usage_perc{{{LLAMA}}} NaN\n"
        f'vllm:num_requests_waiting{{engine="0",{LLAMA}}} -3\n'
        'DCGM_FI_DEV_FB_USED{gpu="0"} 0\nDCGM_FI_DEV_FB_FREE{gpu="0"} 0\n'
    )
    assert parse_scrape(text, at=0.0) == Scrape(at=0.0, waiting=0.0)


def test_a_server_with_none_of_the_known_metrics() -> None:
    assert not parse_scrape(NODE_EXPORTER, at=0.0).known


def test_text_that_is_not_prometheus_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_scrape('{"object": "list", "data": []}', at=0.0)


# --- the model ----------------------------------------------------------------------------


def model(**changes: Any) -> PressureModel:
    return PressureModel(PressureConfig(**changes))


def test_pressure_is_the_largest_signal() -> None:
    m = model(waiting_saturation=10.0)
    m.observe(parse_scrape(VLLM_V1, at=0.0))
    reading = m.reading(now=0.5)
    assert reading.signals == {
        Signal.KV_CACHE: 0.61,
        Signal.WAITING: 0.5,
        Signal.PREEMPTION: 0.0,  # the counter is there; a rate needs two scrapes
    }
    assert reading.pressure == 0.61
    assert (reading.known, reading.stale, reading.age_s) == (True, False, 0.5)


def test_waiting_saturates_at_one() -> None:
    m = model(waiting_saturation=4.0)
    m.observe(Scrape(at=0.0, waiting=2.0))
    assert m.pressure(now=0.0) == 0.5
    m.observe(Scrape(at=1.0, waiting=40.0))
    assert m.pressure(now=1.0) == 1.0


def test_kv_saturation_scales_the_kv_signal() -> None:
    m = model(kv_saturation=0.8)
    m.observe(Scrape(at=0.0, kv_usage=0.4))
    assert m.pressure(now=0.0) == 0.5


def test_preemptions_count_as_a_rate_between_scrapes() -> None:
    m = model(preemption_saturation_per_s=10.0)
    m.observe(Scrape(at=0.0, preemptions_total=15.0))
    m.observe(Scrape(at=2.0, preemptions_total=25.0))
    assert m.preemptions_per_s() == 5.0
    assert m.pressure(now=2.0) == 0.5
    m.observe(Scrape(at=3.0, preemptions_total=1.0))  # the server restarted
    assert m.preemptions_per_s() is None
    assert m.pressure(now=3.0) == 0.0


def test_gpu_memory_counts_only_without_a_kv_cache_signal() -> None:
    m = model()
    m.observe(Scrape(at=0.0, gpu_memory=0.9))
    assert m.pressure(now=0.0) == 0.9
    m.observe(Scrape(at=1.0, gpu_memory=0.92, kv_usage=0.2))  # vLLM preallocates memory
    assert m.reading(now=1.0).signals == {Signal.KV_CACHE: 0.2}
    only_memory = model(signals=frozenset({Signal.GPU_MEMORY}))
    only_memory.observe(Scrape(at=1.0, gpu_memory=0.92, kv_usage=0.2))
    assert only_memory.pressure(now=1.0) == 0.92


def test_disabled_signals_do_not_count() -> None:
    m = model(signals=frozenset({Signal.WAITING}), waiting_saturation=10.0)
    m.observe(parse_scrape(VLLM_V1, at=0.0))
    assert m.reading(now=0.0).signals == {Signal.WAITING: 0.5}


def test_no_scrape_yet_is_saturated() -> None:
    reading = model().reading(now=100.0)
    assert (reading.pressure, reading.stale, reading.known) == (1.0, True, False)
    assert reading.age_s == math.inf


def test_old_data_is_saturated() -> None:
    m = model(stale_after_s=2.0)
    m.observe(Scrape(at=10.0, waiting=0.0))
    assert m.pressure(now=12.0) == 0.0  # exactly stale_after_s old: still fresh
    assert m.pressure(now=12.001) == 1.0
    assert m.reading(now=12.001).stale


def test_a_failed_scrape_counts_once_the_data_is_stale() -> None:
    m = model(stale_after_s=2.0)
    m.observe(Scrape(at=0.0, kv_usage=0.3))
    m.observe_failure("timed out")
    m.observe_failure("connection refused")
    reading = m.reading(now=1.5)
    assert (reading.pressure, reading.failures, reading.last_error) == (
        0.3,
        2,
        "connection refused",
    )
    assert m.pressure(now=2.5) == 1.0
    m.observe(Scrape(at=2.6, kv_usage=0.1))
    reading = m.reading(now=2.6)
    assert (reading.pressure, reading.failures, reading.last_error) == (0.1, 0, None)


def test_only_failures_is_saturated() -> None:
    m = model()
    m.observe_failure("refused")
    assert m.reading(now=0.0).pressure == 1.0


def test_a_backend_without_known_metrics_is_reported_as_unknown() -> None:
    m = model()
    m.observe(parse_scrape(NODE_EXPORTER, at=0.0))
    reading = m.reading(now=0.0)
    assert (reading.pressure, reading.known, reading.stale) == (0.0, False, False)


def test_an_older_scrape_is_ignored() -> None:
    m = model()
    m.observe(Scrape(at=5.0, waiting=0.0))
    m.observe(Scrape(at=4.0, waiting=100.0))
    assert m.pressure(now=5.0) == 0.0


def test_configure_changes_the_rules_live() -> None:
    m = model(waiting_saturation=10.0)
    m.observe(Scrape(at=0.0, waiting=5.0))
    m.configure(PressureConfig(waiting_saturation=5.0))
    assert m.pressure(now=0.0) == 1.0


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"signals": frozenset()}, "pressure.signals"),
        ({"waiting_saturation": 0.0}, "pressure.waiting_saturation"),
        ({"waiting_saturation": math.inf}, "pressure.waiting_saturation"),
        ({"kv_saturation": 1.5}, "pressure.kv_saturation"),
        ({"memory_saturation": 0.0}, "pressure.memory_saturation"),
        ({"preemption_saturation_per_s": -1.0}, "pressure.preemption_saturation_per_s"),
        ({"stale_after_s": math.nan}, "pressure.stale_after_s"),
    ],
)
def test_pressure_config_errors_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} "):
        PressureConfig(**changes)


def test_a_scrape_refuses_negative_or_nan_values() -> None:
    with pytest.raises(ValueError, match=r"^scrape\.waiting "):
        Scrape(at=0.0, waiting=-1.0)
    with pytest.raises(ValueError, match=r"^scrape\.kv_usage "):
        Scrape(at=0.0, kv_usage=math.nan)


values = st.none() | st.floats(min_value=0.0, allow_nan=False)  # infinity included
scrapes = st.builds(
    Scrape,
    at=st.floats(min_value=-1e6, max_value=1e6),
    kv_usage=values,
    waiting=values,
    running=values,
    gpu_memory=values,
    preemptions_total=values,
)
configs = st.builds(
    PressureConfig,
    signals=st.frozensets(st.sampled_from(Signal), min_size=1),
    waiting_saturation=st.floats(min_value=1e-6, max_value=1e6),
    kv_saturation=st.floats(min_value=1e-6, max_value=1.0),
    memory_saturation=st.floats(min_value=1e-6, max_value=1.0),
    preemption_saturation_per_s=st.floats(min_value=1e-6, max_value=1e6),
    stale_after_s=st.floats(min_value=1e-3, max_value=1e3),
)


@given(
    configs,
    st.lists(scrapes | st.just("failure"), max_size=6),
    st.floats(min_value=-1e6, max_value=1e6),
)
def test_pressure_always_lies_in_0_1(
    config: PressureConfig, events: list[Scrape | str], now: float
) -> None:
    m = PressureModel(config)
    for event in events:
        if isinstance(event, Scrape):
            m.observe(event)
        else:
            m.observe_failure(event)
        reading = m.reading(now=now)
        assert 0.0 <= reading.pressure <= 1.0
        assert all(0.0 <= v <= 1.0 for v in reading.signals.values())


# --- config from TOML tables -------------------------------------------------------------


def test_probe_config_defaults_scrape_the_backend_metrics_path() -> None:
    assert ProbeConfig().url_for("http://gpu1:8000/") == "http://gpu1:8000/metrics"
    dcgm = ProbeConfig(metrics_url="http://gpu1:9400/metrics")
    assert dcgm.url_for("http://gpu1:8000") == "http://gpu1:9400/metrics"


def test_probe_config_from_a_toml_table() -> None:
    config = probe_config_from_mapping(
        {
            "metrics_url": "http://gpu1:9400/metrics",
            "interval_s": 1,
            "timeout_s": 0.5,
            "stale_after_s": 5,
            "waiting_saturation": 16,
            "kv_saturation": 0.9,
            "signals": ["kv_cache", "waiting"],
            "exporters": ["vllm"],
        }
    )
    assert config.interval_s == 1.0
    assert config.exporters == frozenset({Exporter.VLLM})
    assert config.pressure == PressureConfig(
        signals=frozenset({Signal.KV_CACHE, Signal.WAITING}),
        waiting_saturation=16.0,
        kv_saturation=0.9,
        stale_after_s=5.0,
    )


def test_a_backend_table_layers_over_a_shared_one() -> None:
    shared = probe_config_from_mapping({"interval_s": 0.25, "waiting_saturation": 4})
    config = probe_config_from_mapping({"enabled": False}, base=shared)
    assert (config.enabled, config.interval_s, config.pressure.waiting_saturation) == (
        False,
        0.25,
        4.0,
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"interval_s": "fast"}, "m.pressure.interval_s: expected float, got str"),
        ({"enabled": 1}, "m.pressure.enabled: expected bool, got int"),
        ({"waiting_saturation": True}, "m.pressure.waiting_saturation: expected float"),
        ({"intervals": 1.0}, "m.pressure.intervals: unknown field"),
        ({"signals": ["kv"]}, "m.pressure.signals: unknown name 'kv'"),
        ({"exporters": "vllm"}, "m.pressure.exporters: expected a list"),
        ({"exporters": []}, "m.pressure.exporters must name at least one"),
        ({"interval_s": 0}, "m.pressure.interval_s must be > 0"),
        ({"stale_after_s": 0.4}, "m.pressure.stale_after_s must be > interval_s"),
        ({"kv_saturation": 2}, "m.pressure.kv_saturation must be in"),
        ({"metrics_url": "gpu1:9400"}, "m.pressure.metrics_url must be an http"),
    ],
)
def test_probe_config_errors_name_the_field(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        probe_config_from_mapping(table, where="m.pressure")
    assert str(info.value).startswith(message)


# --- probes and pools without a network --------------------------------------------------


class CannedProbe(ModelProbe):
    """A probe whose next scrape is set by the test (a fake backend)."""

    def __init__(self, name: str, config: PressureConfig | None = None) -> None:
        super().__init__(name, config or PressureConfig(), interval_s=0.25)
        self.next: Scrape | str = "no scrape set"
        self.scrapes = 0

    async def _scrape(self, now: float) -> Scrape:
        self.scrapes += 1
        if isinstance(self.next, str):
            raise ScrapeError(self.next)
        return Scrape(
            at=now,
            kv_usage=self.next.kv_usage,
            waiting=self.next.waiting,
            gpu_memory=self.next.gpu_memory,
        )


async def probes(*nexts: Scrape | str, now: float = 0.0) -> list[CannedProbe]:
    made = []
    for i, value in enumerate(nexts):
        probe = CannedProbe(f"http://b{i}")
        probe.next = value
        await probe.scrape_once(now)
        made.append(probe)
    return made


async def test_a_pool_takes_the_mean_of_its_backends_by_default() -> None:
    pool = PoolPressure(await probes(Scrape(at=0, kv_usage=0.2), Scrape(at=0, kv_usage=0.6)))
    assert pool.pressure(0.0) == pytest.approx(0.4)
    assert PoolPressure(pool.probes, aggregate=Aggregate.MAX).pressure(0.0) == 0.6


async def test_a_pool_counts_a_failing_backend_as_saturated_once_stale() -> None:
    pool = PoolPressure(await probes(Scrape(at=0, kv_usage=0.2), "refused"))
    assert pool.pressure(0.0) == pytest.approx(0.6)
    stats = pool.statistics(0.0)
    assert stats.backends["http://b1"].stale
    assert stats.backends["http://b1"].last_error == "refused"
    assert pool.pressure(10.0) == 1.0  # both stale now


async def test_a_pool_leaves_out_backends_with_no_known_metrics() -> None:
    pool = PoolPressure(await probes(Scrape(at=0, waiting=4.0), Scrape(at=0)))
    assert pool.pressure(0.0) == 0.5
    only_unknown = PoolPressure(await probes(Scrape(at=0)))
    assert only_unknown.pressure(0.0) == 0.0
    assert not only_unknown.statistics(0.0).backends["http://b0"].known


async def test_a_pool_leaves_out_the_backends_it_does_not_route_to() -> None:
    live, dead, exporter = await probes(Scrape(at=0, kv_usage=0.4), "refused", "refused")
    exporter.next = Scrape(at=0, kv_usage=0.2)  # a probe that is no backend: always counted
    ejected = {"http://b1"}
    pool = PoolPressure([live, dead, exporter], in_rotation=lambda name: name not in ejected)
    assert pool.pressure(10.0) == 1.0  # all stale: the live one too
    await live.scrape_once(10.0)
    await exporter.scrape_once(10.0)
    assert pool.pressure(10.0) == pytest.approx(0.3)  # not (0.4 + 1.0 + 0.2) / 3: b1 is out
    assert pool.scraped_at(10.5) == pytest.approx(10.0)
    stats = pool.statistics(10.0)
    assert stats.pressure == pytest.approx(0.3) and stats.out_of_rotation == {"http://b1"}
    assert stats.backends["http://b1"].stale  # still reported, only not counted
    ejected.update({"http://b0", "http://b2"})
    assert pool.pressure(10.0) == 0.0  # none in rotation: nothing to feed, nothing to hold back
    ejected.clear()
    assert pool.pressure(10.0) == pytest.approx(1.6 / 3)  # back in rotation, still stale


def test_pool_probe_names_must_differ() -> None:
    with pytest.raises(ValueError, match="distinct"):
        PoolPressure([CannedProbe("a"), CannedProbe("a")])


@given(st.lists(st.floats(min_value=0.0, max_value=1e9) | st.none(), min_size=1, max_size=5))
def test_a_pools_pressure_lies_in_0_1(waiting: list[float | None]) -> None:
    config = PressureConfig(stale_after_s=1.0)
    pool_probes = [CannedProbe(f"b{i}", config) for i in range(len(waiting))]
    for probe, value in zip(pool_probes, waiting, strict=True):
        if value is not None:
            probe.model.observe(Scrape(at=0.0, waiting=value))
    for aggregate in Aggregate:
        pool = PoolPressure(pool_probes, aggregate=aggregate)
        for now in (0.0, 0.5, 2.0):
            assert 0.0 <= pool.pressure(now) <= 1.0


async def test_the_run_loop_scrapes_on_its_interval_and_turns_stale_on_failures(
    autojump_clock: trio.testing.MockClock,
) -> None:
    probe = CannedProbe("http://b0", PressureConfig(stale_after_s=1.0))
    probe.next = Scrape(at=0.0, kv_usage=0.25)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe.run)
        await trio.sleep(1.1)  # virtual time: scrapes at 0, 0.25, ..., 1.0
        assert probe.scrapes == 5
        assert probe.pressure(trio.current_time()) == 0.25
        probe.next = "timed out"
        failed_at = trio.current_time()
        await trio.sleep(0.95)  # the last good scrape (at 1.0) is 1.05 s old
        assert probe.pressure(trio.current_time()) == 1.0
        assert probe.reading(failed_at + 0.1).pressure == 0.25
        nursery.cancel_scope.cancel()


# --- through real sockets ----------------------------------------------------------------


LOADED_GPU = GpuConfig(max_batch=2, decode_base_s=0.02, decode_per_seq_s=0.0)


async def wait_reading(probe: MetricsProbe, ok: Any) -> PressureReading:
    """The first reading for which `ok(reading)` holds (the caller holds the deadline)."""
    while not ok(reading := probe.reading(trio.current_time())):
        await trio.sleep(0.01)
    return reading


async def test_pressure_rises_under_load_and_falls_after_it() -> None:
    config = probe_config_from_mapping(
        {"interval_s": 0.02, "stale_after_s": 1.0, "waiting_saturation": 2}
    )
    with trio.fail_after(8), ExitStack() as stack:
        async with (
            httpx2.AsyncClient(timeout=10) as client,
            trio.open_nursery() as nursery,
        ):
            port = await nursery.start(serve_demo_backend, DemoConfig(gpu=LOADED_GPU))
            url = f"http://127.0.0.1:{port}"
            probes = stack.enter_context(closing(HttpClient(BackendLimits())))
            pool = PoolPressure.for_backends([(url, config)], probes)
            probe = pool.probes[0]
            assert isinstance(probe, MetricsProbe)
            nursery.start_soon(pool.run)
            idle = await wait_reading(probe, lambda r: not r.stale)
            assert idle.pressure == 0.0

            async def request() -> None:
                body = {"model": "demo-small", "messages": [{"role": "user", "content": "hi"}]}
                response = await client.post(
                    f"{url}/v1/chat/completions", json=body | {"max_tokens": 15}
                )
                assert response.status_code == 200

            async with trio.open_nursery() as load:
                for _ in range(6):  # 2 run, 4 wait: waiting 4 then 2 then 0
                    load.start_soon(request)
                busy = await wait_reading(probe, lambda r: r.pressure > 0.5 and not r.stale)
                assert pool.statistics().pressure > 0.5
                assert busy.signals[Signal.WAITING] > 0.5
                assert busy.scrape is not None and busy.scrape.running == 2.0
            after = await wait_reading(probe, lambda r: r.pressure < 0.1)
            assert after.known and pool.pressure(trio.current_time()) < 0.1
            nursery.cancel_scope.cancel()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    yield port


async def test_an_unreachable_backend_is_saturated(closed_port: int) -> None:
    with trio.fail_after(5):
        probe = MetricsProbe(f"http://127.0.0.1:{closed_port}", HttpClient(BackendLimits()))
        reading = await probe.scrape_once(trio.current_time())
    assert (reading.pressure, reading.stale, reading.failures) == (1.0, True, 1)
    assert reading.last_error is not None and "BackendUnavailable" in reading.last_error


async def test_a_missing_metrics_path_is_unknown_and_junk_is_a_failure() -> None:
    with trio.fail_after(5), closing(HttpClient(BackendLimits())) as client:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_demo_backend, DemoConfig(gpu=LOADED_GPU))
            url = f"http://127.0.0.1:{port}"
            missing = MetricsProbe(url, client, ProbeConfig(metrics_url=f"{url}/nothing"))
            reading = await missing.scrape_once(trio.current_time())
            assert (reading.pressure, reading.known, reading.stale) == (0.0, False, False)
            junk = MetricsProbe(url, client, ProbeConfig(metrics_url=f"{url}/v1/models"))
            reading = await junk.scrape_once(trio.current_time())
            assert (reading.pressure, reading.failures) == (1.0, 1)
            assert reading.last_error is not None and "not Prometheus" in reading.last_error
            nursery.cancel_scope.cancel()


# --- NVML ----------------------------------------------------------------------------------


class FakeNvml:
    """pynvml's interface (and camelCase names) over made-up GPUs: (used, total) bytes."""

    class NVMLError(Exception):
        pass

    @dataclass
    class Memory:
        used: int
        total: int

    def __init__(self, gpus: list[tuple[int, int]]) -> None:
        self.gpus = gpus
        self.initialised = False

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.gpus):
            raise self.NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> FakeNvml.Memory:
        return self.Memory(*self.gpus[handle])


async def test_nvml_probe_reads_the_fullest_gpu() -> None:
    nvml = FakeNvml([(2 << 30, 80 << 30), (60 << 30, 80 << 30)])
    probe = NvmlProbe.open(nvml=nvml)
    reading = await probe.scrape_once(0.0)
    assert reading.signals == {Signal.GPU_MEMORY: 0.75}
    probe.close()
    assert not nvml.initialised


def test_nvml_without_gpus_or_bad_devices_is_unavailable() -> None:
    with pytest.raises(NvmlUnavailable, match="no GPU"):
        NvmlProbe.open(nvml=FakeNvml([]))
    with pytest.raises(NvmlUnavailable, match="Invalid Argument"):
        NvmlProbe.open(nvml=FakeNvml([(1, 2)]), device_indices=[3])


@pytest.fixture
def local_nvml() -> Iterator[NvmlProbe]:
    """NVML on this machine's GPUs; skips where nvidia-ml-py or a GPU is missing."""
    try:
        probe = NvmlProbe.open()
    except NvmlUnavailable as exc:
        pytest.skip(str(exc))
    yield probe
    probe.close()


async def test_nvml_on_this_machine(local_nvml: NvmlProbe) -> None:
    reading = await local_nvml.scrape_once(0.0)
    assert reading.known and 0.0 <= reading.pressure <= 1.0


async def test_a_pool_tells_when_its_oldest_fresh_scrape_was_taken() -> None:
    first, second = await probes(Scrape(at=0, kv_usage=0.2), Scrape(at=0, kv_usage=0.6))
    await second.scrape_once(0.75)
    pool = PoolPressure([first, second])
    assert pool.scraped_at(1.0) == pytest.approx(0.0)  # the older scrape is behind the mean
    assert pool.scraped_at(10.0) == 10.0  # both stale: read as saturated, nothing to credit
