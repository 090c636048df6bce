"""The GPU model: batch slowdown, KV-cache admission, waiting room, cancel."""

from __future__ import annotations

import dataclasses
import math

import pytest

from scheduler.models.gpu import GpuConfig, GpuModel


def test_one_sequence_timing() -> None:
    cfg = GpuConfig(decode_base_s=0.01, decode_per_seq_s=0.0, prefill_tokens_per_step=100)
    gpu = GpuModel(cfg)
    seq = gpu.submit(1, prompt_tokens=200, output_tokens=10, now=0.0)
    assert seq is not None
    assert gpu.next_event_at() == pytest.approx(0.03)  # 2 prefill steps + the first token
    assert gpu.advance(0.029) == []
    assert math.isnan(seq.first_token_at)
    assert gpu.advance(0.2) == [seq]
    assert seq.first_token_at == pytest.approx(0.03)
    assert seq.finished_at == pytest.approx(0.12)


def test_more_sequences_make_each_token_slower_but_more_in_total() -> None:
    cfg = GpuConfig(decode_base_s=0.01, decode_per_seq_s=0.01)
    alone = GpuModel(cfg)
    assert alone.submit(1, 0, 100, now=0) is not None
    (done,) = alone.advance(100)
    crowd = GpuModel(cfg)
    for i in range(4):
        crowd.submit(i, 0, 100, now=0)
    finished = crowd.advance(100)
    assert len(finished) == 4
    assert finished[0].finished_at > done.finished_at
    assert finished[-1].finished_at < 4 * done.finished_at


def test_a_lone_sequence_steps_at_its_own_time_and_two_at_the_line() -> None:
    # llama.cpp on a CPU: 3.3 ms a token alone, 6.1 ms for two, 7.9 ms for four
    cfg = GpuConfig(decode_base_s=0.0043, decode_per_seq_s=0.0009, decode_alone_s=0.0033)
    assert (cfg.step_s(1), cfg.step_s(2), cfg.step_s(4)) == pytest.approx((0.0033, 0.0061, 0.0079))
    assert dataclasses.replace(cfg, decode_alone_s=0).step_s(1) == pytest.approx(0.0052)
    gpu = GpuModel(cfg)
    first = gpu.submit(1, 0, 11, now=0.0)
    second = gpu.submit(2, 0, 21, now=0.0)
    assert first is not None and second is not None
    gpu.advance(1.0)
    # together for 11 steps of 6.1 ms, then the second alone for 10 of 3.3 ms
    assert first.finished_at == pytest.approx(11 * 0.0061)
    assert second.finished_at == pytest.approx(11 * 0.0061 + 10 * 0.0033)
    with pytest.raises(ValueError, match=r"backend\.decode_alone_s"):
        GpuConfig(decode_alone_s=-1)


def test_batch_and_kv_limits_make_requests_wait_then_refuse() -> None:
    cfg = GpuConfig(max_batch=2, kv_capacity_tokens=1000, max_waiting=1, decode_per_seq_s=0)
    gpu = GpuModel(cfg)
    a = gpu.submit(1, 0, 400, now=0)
    b = gpu.submit(2, 0, 400, now=0)
    c = gpu.submit(3, 0, 100, now=0)
    assert a and b and c
    assert (gpu.running, gpu.waiting) == (2, 1)
    assert gpu.submit(4, 0, 10, now=0) is None  # waiting room full
    assert gpu.submit(5, 2000, 10, now=0) is None  # never fits the KV cache
    finished = gpu.advance(100)
    assert [s.id for s in finished] == [1, 2, 3]
    assert c.started_at == pytest.approx(a.finished_at)
    assert gpu.statistics().refused == 2


def test_cancel_frees_the_slot_for_the_next() -> None:
    gpu = GpuModel(GpuConfig(max_batch=1, decode_per_seq_s=0))
    a = gpu.submit(1, 0, 1000, now=0)
    b = gpu.submit(2, 0, 10, now=0)
    assert a and b
    gpu.cancel(a, now=1.0)
    assert b.started_at == 1.0
    assert gpu.advance(100) == [b]
    assert gpu.statistics().kv_used_tokens == 0


def test_a_cancelled_sequence_leaves_no_event_behind() -> None:
    gpu = GpuModel(GpuConfig(decode_base_s=0.01, decode_per_seq_s=0))
    a = gpu.submit(1, 100, 50, now=0)
    b = gpu.submit(2, 100, 10, now=0)
    assert a and b
    gpu.cancel(b, now=0.001)  # before its first token and its end, which came before a's
    assert gpu.next_event_at() == pytest.approx(0.001 + (a.first_step - 0.1) * 0.01)
    assert gpu.next_finish_at() == pytest.approx(0.001 + (a.done_step - 0.1) * 0.01)
    finished = gpu.advance(100)
    assert finished == [a] and math.isnan(b.first_token_at)
    assert gpu.next_event_at() == gpu.next_finish_at() == math.inf


def test_tokens_stream_on_schedule() -> None:
    gpu = GpuModel(GpuConfig(decode_base_s=0.01, decode_per_seq_s=0))
    seq = gpu.submit(1, 0, 10, now=0)
    assert seq is not None
    assert gpu.token_at(seq, 5) == pytest.approx(0.05)
    gpu.advance(0.055)
    assert gpu.tokens_done(seq, now=0.055) == 5


def test_zero_decode_time_finishes_at_once() -> None:
    gpu = GpuModel(GpuConfig(decode_base_s=0, decode_per_seq_s=0))
    seq = gpu.submit(1, 10, 50, now=3.0)
    assert seq is not None
    assert gpu.advance(3.0) == [seq]
    assert seq.finished_at == 3.0


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"backend\.max_batch"):
        GpuConfig(max_batch=0)


def test_a_newcomers_prompt_slows_the_running_sequences_by_its_prefill_cost() -> None:
    """With a cost per prompt token, prefill is paid by the whole batch (a real engine's way):
    a running sequence's tokens are late by exactly the newcomer's prompt time."""
    cfg = GpuConfig(
        decode_base_s=0.01,
        decode_per_seq_s=0.0,
        prefill_tokens_per_step=1000,
        prefill_s_per_token=0.001,
    )
    alone, shared = GpuModel(cfg), GpuModel(cfg)
    a = alone.submit(1, 0, 50, now=0.0)
    b = shared.submit(1, 0, 50, now=0.0)
    newcomer = shared.submit(2, 200, 5, now=0.105)
    assert a is not None and b is not None and newcomer is not None
    for model in (alone, shared):
        model.advance(10.0)
    assert b.finished_at - a.finished_at == pytest.approx(0.2)  # 200 tokens x 1 ms
    # the newcomer: 0.2 steps of prompt (0.01 * 0.2 + 0.2 s), then its first token one step on
    assert newcomer.first_token_at - 0.105 == pytest.approx(0.002 + 0.2 + 0.01)
    assert GpuConfig().prefill_s_per_token == 0.0  # the demo's default model is unchanged


def test_a_prompt_that_joins_decoding_sequences_costs_the_batch_its_join() -> None:
    """llama.cpp's join cost (bench/FIDELITY.md): a prompt that starts while others decode
    costs `prefill_join_s` more per decoding sequence, paid by the whole batch; a burst into
    an idle engine and a wave that follows one ending together pay nothing."""
    cfg = GpuConfig(
        max_batch=4,
        decode_base_s=0.01,
        decode_per_seq_s=0.0,
        prefill_tokens_per_step=1000,
        prefill_s_per_token=0.001,
    )
    joining = dataclasses.replace(cfg, prefill_join_s=0.005)

    def join(gpu: GpuConfig) -> tuple[float, float]:
        model = GpuModel(gpu)
        running = [model.submit(i, 0, 50, now=0.0) for i in range(3)]
        newcomer = model.submit(9, 100, 5, now=0.105)
        model.advance(10.0)
        assert newcomer is not None and running[0] is not None
        return newcomer.first_token_at - 0.105, running[0].finished_at

    (plain_ttft, plain_end), (ttft, end) = join(cfg), join(joining)
    # 3 decoding x 5 ms = 15 ms more prefill: the newcomer's first token and everyone's end
    assert ttft - plain_ttft == pytest.approx(0.015, rel=0.02)
    assert end - plain_end == pytest.approx(0.015, rel=0.02)

    def waves(gpu: GpuConfig) -> list[float]:
        model = GpuModel(gpu)  # 8 at once into 4 slots: the second wave starts as one
        seqs = [model.submit(i, 100, 10, now=0.0) for i in range(8)]
        model.advance(10.0)
        return [s.first_token_at for s in seqs if s is not None]

    assert waves(joining) == pytest.approx(waves(cfg))
    assert GpuConfig().prefill_join_s == 0.0  # the demo's default model is unchanged
    with pytest.raises(ValueError, match="prefill_s_per_token"):
        GpuConfig(prefill_join_s=0.005)  # a join is paid as prefill: it needs a prefill cost


def test_each_token_of_context_in_the_batch_slows_every_step() -> None:
    """With a cost per KV token, a sequence decodes slower beside a long-prompt one: each step
    pays for the batch's context (prompt plus half the output, per running sequence)."""
    cfg = GpuConfig(
        decode_base_s=0.01,
        decode_per_seq_s=0.0,
        prefill_tokens_per_step=1e9,  # prompts in no time: only the decode steps count
        decode_per_kv_token_s=0.00001,
    )
    alone, beside = GpuModel(cfg), GpuModel(cfg)
    a = alone.submit(1, 0, 11, now=0.0)
    b = beside.submit(1, 0, 11, now=0.0)
    long = beside.submit(2, 1000, 11, now=0.0)
    assert a is not None and b is not None and long is not None
    for model in (alone, beside):
        model.advance(10.0)
    # alone: each step 0.01 + 5.5 tokens x 10 us; beside the 1000-token prompt, 10.1 ms more
    assert a.finished_at == pytest.approx(11 * (0.01 + 5.5e-5))
    assert b.finished_at == pytest.approx(11 * (0.01 + 11e-5 + 0.01))
    assert GpuConfig().decode_per_kv_token_s == 0.0  # the demo's default model is unchanged


def test_next_finish_at_is_the_earliest_end_or_a_prompt_done_sooner() -> None:
    cfg = GpuConfig(decode_base_s=0.01, decode_per_seq_s=0.0, prefill_tokens_per_step=100)
    gpu = GpuModel(cfg)
    assert gpu.next_finish_at() == math.inf
    long = gpu.submit(1, 0, 100, now=0.0)
    short = gpu.submit(2, 0, 10, now=0.0)
    assert long and short
    assert gpu.next_finish_at() == pytest.approx(0.1)  # first tokens end nothing
    gpu.cancel(short, now=0.05)
    assert gpu.next_finish_at() == pytest.approx(1.0)  # a cancelled end is not reported
    costed = GpuModel(GpuConfig(decode_base_s=0.01, decode_per_seq_s=0.0, prefill_s_per_token=1e-4))
    assert costed.submit(1, 512, 100, now=0.0) is not None
    assert costed.next_finish_at() == pytest.approx(0.01 + 512 * 1e-4)  # the prompt's step


def test_the_engines_waiting_count_takes_in_a_request_sent_during_a_prompt_when_its_step_ends() -> (
    None
):
    # llama.cpp declines new requests while a step computes (tests/backends/
    # test_llama_server.py shows it): one sent while a costed prompt is prefilled is waiting
    # but not yet in the count the engine's /metrics show, until that prompt is done.
    cfg = GpuConfig(
        max_batch=1,
        decode_base_s=0.01,
        decode_per_seq_s=0.0,
        prefill_tokens_per_step=100,
        prefill_s_per_token=0.001,
    )
    gpu = GpuModel(cfg)
    a = gpu.submit(1, prompt_tokens=200, output_tokens=10, now=0.0)
    b = gpu.submit(2, prompt_tokens=10, output_tokens=10, now=0.05)
    assert a and b
    prompt_done_at = 2 * (0.01 + 100 * 0.001)  # two prefill steps of 100 tokens
    assert (gpu.waiting, gpu.waiting_seen(0.05), gpu.waiting_seen(prompt_done_at - 1e-9)) == (
        1,
        0,
        0,
    )
    assert gpu.waiting_seen(prompt_done_at) == 1
    assert gpu.statistics().waiting_seen == 0  # as of the model's time, 0.05
    gpu.advance(prompt_done_at + 0.001)
    assert gpu.statistics().waiting_seen == 1
    c = gpu.submit(3, prompt_tokens=10, output_tokens=10, now=0.3)  # only decoding: counted
    assert c is not None and gpu.waiting_seen(0.3) == 2


def test_without_a_prompt_cost_every_waiting_request_is_counted_at_once() -> None:
    gpu = GpuModel(GpuConfig(max_batch=1, decode_per_seq_s=0.0))
    gpu.submit(1, prompt_tokens=500, output_tokens=10, now=0.0)
    gpu.submit(2, prompt_tokens=10, output_tokens=10, now=0.001)
    assert gpu.waiting_seen(0.001) == gpu.waiting == 1
