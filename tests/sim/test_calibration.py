"""The calibration fit, on measurements made by a known model: it must find that model again."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler.models.gpu import GpuConfig
from sim.calibration import (
    JoinPoint,
    Point,
    backends_section,
    fit,
    kv_capacity_from_metrics,
    predict_burst,
    predict_join,
    running_from_metrics,
    saturation_concurrency,
)
from sim.scenario import parse_scenario

TRUE = GpuConfig(
    max_batch=4, decode_base_s=0.004, decode_per_seq_s=0.0015, prefill_tokens_per_step=64.0
)
TIER = """
name = "calibrated"
duration_s = 10
[[tiers]]
name = "free"
weight = 1
max_wait_s = 1
slo_latency_s = 2
rate_rps = 1
"""


def measured(gpu: GpuConfig, *, scale: float = 1.0) -> list[Point]:
    """Bursts as an engine that is exactly `gpu` would show them (times scaled by `scale`)."""
    points = []
    for prompt in (32, 256):
        tps = 0.0
        for concurrency in (1, 2, 4, 8, 16):
            probe = Point(concurrency, prompt, 24, 0.0, 0.0, 0.0)
            predicted = predict_burst(gpu, probe)
            ttft, tpot = predicted.ttft_s * scale, predicted.tpot_s * scale
            if concurrency <= gpu.max_batch:  # beyond the batch, throughput stays flat
                tps = concurrency * 24 / (ttft + 23 * tpot)
            points.append(Point(concurrency, prompt, 24, ttft, tpot, tps))
    return points


ENGINE = GpuConfig(  # llama.cpp's way: a prompt in one step, paid per token by the batch
    max_batch=4,
    decode_base_s=0.004,
    decode_per_seq_s=0.0015,
    prefill_tokens_per_step=2048.0,
    prefill_s_per_token=0.0005,
)


ATTENTION = dataclasses.replace(ENGINE, decode_per_kv_token_s=0.000004)  # context costs too


@pytest.mark.parametrize(
    "gpu",
    [TRUE, ENGINE, ATTENTION],
    ids=["per-step prefill", "per-token prefill", "per-token decode context"],
)
def test_the_fit_finds_the_model_that_made_the_measurements(gpu: GpuConfig) -> None:
    result = fit(measured(gpu))
    assert result.gpu.decode_per_kv_token_s == pytest.approx(gpu.decode_per_kv_token_s, abs=1e-12)
    assert result.gpu.max_batch == 4
    assert result.gpu.decode_base_s == pytest.approx(gpu.decode_base_s, rel=1e-6)
    assert result.gpu.decode_per_seq_s == pytest.approx(gpu.decode_per_seq_s, rel=1e-6)
    assert result.gpu.prefill_tokens_per_step == pytest.approx(gpu.prefill_tokens_per_step)
    assert result.gpu.prefill_s_per_token == pytest.approx(gpu.prefill_s_per_token, abs=1e-9)
    assert result.mean_error == pytest.approx(0.0, abs=1e-6)


def test_the_fit_finds_a_lone_sequences_own_step() -> None:
    """An engine whose second sequence nearly doubles the time per token (llama.cpp on a
    CPU): a line through one, two and four sequences is too fast at two; the fit takes the
    bursts of one apart and finds both."""
    lone = dataclasses.replace(ATTENTION, decode_alone_s=0.004)  # 5.5 ms were the line's
    result = fit(measured(lone))
    assert result.gpu.decode_alone_s == pytest.approx(0.004, rel=1e-6)
    assert result.gpu.decode_base_s == pytest.approx(lone.decode_base_s, rel=1e-6)
    assert result.gpu.decode_per_seq_s == pytest.approx(lone.decode_per_seq_s, rel=1e-6)
    assert result.mean_error == pytest.approx(0.0, abs=1e-6)
    assert "decode_alone_s = 0.004" in backends_section(result)
    # a batch of 2 (llama-server --parallel 2): one batch size of two or more, whose step is
    # all the line has to give; the lone step apart from it still (a line through one and
    # two put the step of one 85 % over and of two 26-35 % over, bench/FIDELITY.md)
    pair = dataclasses.replace(lone, max_batch=2)
    two = fit(measured(pair))
    assert two.gpu.decode_alone_s == pytest.approx(0.004, rel=1e-6)
    assert two.gpu.step_s(2) == pytest.approx(pair.step_s(2), rel=1e-6)
    assert two.gpu.decode_per_kv_token_s == pytest.approx(pair.decode_per_kv_token_s, rel=1e-6)
    assert two.mean_error == pytest.approx(0.0, abs=1e-6)


def test_a_line_whose_best_intercept_is_negative_goes_through_the_origin() -> None:
    """Steps that grow faster than the batch (6 ms a token for two, 16 for four; one prompt
    length, so no context term): the best line's intercept is negative, and the fit's terms
    are not. Clipping it to 0 and keeping the slope put both 25-67 % over."""
    points = [
        Point(c, 32, 24, 0.001 * c * 32 * 0.5 + tpot, tpot, c * 24 / (24 * tpot))
        for c, tpot in ((2, 0.006), (4, 0.016))
    ]
    result = fit(points, max_batch=4)
    assert result.gpu.decode_base_s == 0.0
    assert max(e.tpot_error for e in result.errors) < 0.2


def test_the_fit_finds_the_join_cost_that_bursts_never_show() -> None:
    """An engine whose prompts cost 6 ms per decoding sequence when they join a batch: its
    bursts are the same as without (the fit's other terms do not move), its joins find it."""
    joiner = dataclasses.replace(ENGINE, prefill_join_s=0.006)
    assert measured(joiner) == measured(ENGINE)
    joins = [
        JoinPoint(3, prompt, prompt, 72, predict_join(joiner, JoinPoint(3, prompt, prompt, 72, 0)))
        for prompt in (32, 256)
    ]
    without = fit(measured(joiner))
    result = fit(measured(joiner), joins=joins)
    assert without.gpu.prefill_join_s == 0.0
    assert result.gpu.prefill_join_s == pytest.approx(0.006, rel=0.02)
    assert dataclasses.replace(result.gpu, prefill_join_s=0.0) == without.gpu
    assert max(e.ttft_error for e in result.join_errors) < 0.01
    assert "prefill_join_s = 0.006" in backends_section(result)


def _lone_overhead(gpu: GpuConfig, factor: float) -> list[Point]:
    """`gpu`'s bursts with a lone request's first token `factor` times slower than the model
    has it (an overhead of its own, which a real engine's bursts show)."""
    return [
        dataclasses.replace(p, ttft_s=factor * p.ttft_s) if p.concurrency == 1 else p
        for p in measured(gpu)
    ]


def test_the_joins_choose_the_prefill_form_that_the_bursts_leave_open() -> None:
    """llama.cpp prefills a whole prompt in one step, paid per token. Its bursts, with a lone
    request's first token 60 % slower, are fitted better by a few prompt tokens a step at no
    cost per token: a form that misses every prompt joining a running batch (bench/
    FIDELITY.md, 2026-12-08: 78 %). The joins choose."""
    points = _lone_overhead(ENGINE, 1.6)
    joins = [
        JoinPoint(3, prompt, prompt, 72, predict_join(ENGINE, JoinPoint(3, prompt, prompt, 72, 0)))
        for prompt in (32, 256)
    ]
    bursts_alone = fit(points)
    assert bursts_alone.gpu.prefill_tokens_per_step < 100
    assert bursts_alone.gpu.prefill_s_per_token == 0.0
    result = fit(points, joins=joins)
    assert result.gpu.prefill_tokens_per_step == pytest.approx(2048.0)
    assert result.gpu.prefill_s_per_token == pytest.approx(ENGINE.prefill_s_per_token, rel=0.2)
    assert max(e.ttft_error for e in result.join_errors) < 0.1
    missed = [abs(predict_join(bursts_alone.gpu, j) - j.ttft_s) / j.ttft_s for j in joins]
    assert min(missed) > 0.3
    assert max(e.ttft_error for e in result.errors) > max(e.ttft_error for e in bursts_alone.errors)


def test_the_prefill_is_one_form_never_a_mix_of_both() -> None:
    """With a lone request's first token 20 % slower, both terms free fitted 25 prompt tokens
    a step at 0.39 ms each, closer to those bursts; replayed, such a mix lets a long prompt
    take several steps, each advancing every decoding sequence, which llama.cpp does not
    (bench/FIDELITY.md, 2026-12-08 later: Free admitted 0.49 simulated, 0.30 live)."""
    result = fit(_lone_overhead(ENGINE, 1.2))
    assert result.gpu.prefill_tokens_per_step == pytest.approx(2048.0)
    assert result.gpu.prefill_s_per_token == pytest.approx(ENGINE.prefill_s_per_token, rel=0.1)


def test_a_point_off_the_model_shows_in_its_error_and_barely_moves_the_fit() -> None:
    points = measured(TRUE)
    slow = points[1]  # concurrency 2, prompt 32: a stalled burst, 3x slower decode
    points[1] = Point(
        slow.concurrency, slow.prompt_tokens, 24, slow.ttft_s, 3 * slow.tpot_s, slow.throughput_tps
    )
    result = fit(points)
    errors = {(e.point.concurrency, e.point.prompt_tokens): e for e in result.errors}
    assert errors[(2, 32)].tpot_error > 0.5
    assert errors[(1, 256)].tpot_error < 0.25
    assert result.gpu.max_batch == 4


def test_the_engines_own_batch_wins_over_a_noisy_knee() -> None:
    """Two noisy bursts can move the throughput's knee by a factor of 2 (bench/FIDELITY.md):
    the running count the engine's metrics showed is the batch, the knee is still reported."""
    points = measured(ENGINE)
    points = [  # the c = 8 bursts happened to run faster: throughput still "grows" at 8
        dataclasses.replace(p, throughput_tps=p.throughput_tps * 1.3) if p.concurrency == 8 else p
        for p in points
    ]
    assert fit(points).gpu.max_batch == 8
    told = fit(points, max_batch=4)
    assert told.gpu.max_batch == 4 and told.saturation_concurrency == 8
    assert told.gpu.decode_per_seq_s == pytest.approx(ENGINE.decode_per_seq_s, rel=1e-6)


def test_the_running_count_from_each_engines_metrics() -> None:
    llama = "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 4\n"
    vllm = (
        'vllm:num_requests_running{model_name="a"} 3.0\n'
        'vllm:num_requests_running{model_name="b"} 2.0\n'
    )
    assert running_from_metrics(llama) == 4
    assert running_from_metrics(vllm) == 5  # every model's series
    assert running_from_metrics("sglang:num_running_reqs 7\n") == 7
    assert running_from_metrics('tgi_batch_current_size{x="y"} 6\n') == 6
    assert running_from_metrics("llamacpp:kv_cache_tokens 1024\n") is None


def test_saturation_is_where_throughput_stops_growing() -> None:
    points = [
        Point(c, 32, 24, 0.01, 0.01, tps)
        for c, tps in ((1, 100.0), (2, 190.0), (4, 330.0), (8, 340.0), (16, 335.0))
    ]
    assert saturation_concurrency(points) == 4


def test_the_section_loads_as_the_scenarios_backends() -> None:
    result = fit(measured(TRUE), kv_capacity_tokens=8192, max_waiting=64)
    scenario = parse_scenario(TIER + backends_section(result, comment="from a test"))
    assert scenario.backends.count == 1
    gpu = scenario.backends.gpu
    assert (gpu.max_batch, gpu.kv_capacity_tokens, gpu.max_waiting) == (4, 8192, 64)
    assert gpu.decode_per_seq_s == pytest.approx(0.0015, rel=1e-5)


def test_kv_capacity_from_each_engines_metrics() -> None:
    sglang = '# TYPE sglang:max_total_num_tokens gauge\nsglang:max_total_num_tokens{a="b"} 9000\n'
    vllm = 'vllm:cache_config_info{block_size="16",num_gpu_blocks="512"} 1.0\n'
    llama = "llamacpp:kv_cache_usage_ratio 0.25\nllamacpp:kv_cache_tokens 1024\n"
    assert kv_capacity_from_metrics(sglang) == 9000
    assert kv_capacity_from_metrics(vllm) == 8192
    assert kv_capacity_from_metrics(llama) == 4096
    assert kv_capacity_from_metrics("llamacpp:requests_processing 0\n") is None
