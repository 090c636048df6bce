"""What a backend pool can serve: the yardstick for "goodput vs capacity" and for the rate
mode's limits. Pure arithmetic over the GPU model's own config."""

from __future__ import annotations

import math

from scheduler.models.gpu import GpuConfig, context_of
from sim.engine.model import BackendPool, Process, Scenario, SizeDist, SizeKind


def expected_size(dist: SizeDist) -> float:
    """The distribution's mean before clamping (the clamp moves it little in sane scenarios)."""
    if dist.kind is SizeKind.UNIFORM:
        return (dist.min + dist.max) / 2
    return float(min(dist.max, max(dist.min, dist.mean)))


def mean_sizes(scenario: Scenario) -> tuple[float, float]:
    """Offered-rate-weighted mean (prompt, output) tokens over the tiers."""
    weights = [
        t.arrivals.rate_rps if t.arrivals.process is Process.POISSON else 1.0
        for t in scenario.tiers
    ]
    total = sum(weights) or 1.0
    prompt = sum(
        w * expected_size(t.prompt_tokens) for w, t in zip(weights, scenario.tiers, strict=False)
    )
    output = sum(
        w * expected_size(t.output_tokens) for w, t in zip(weights, scenario.tiers, strict=False)
    )
    return prompt / total, output / total


def full_batch(gpu: GpuConfig, prompt_tokens: float, output_tokens: float) -> int:
    """Sequences that run at once: the batch cap, or fewer if the KV cache is the bound."""
    kv = max(1.0, prompt_tokens + output_tokens)
    return max(1, min(gpu.max_batch, math.floor(gpu.kv_capacity_tokens / kv)))


def request_time_s(gpu: GpuConfig, prompt_tokens: float, output_tokens: float) -> float:
    """Backend time of one mean request at a full batch."""
    steps = output_tokens + prompt_tokens / gpu.prefill_tokens_per_step
    batch = full_batch(gpu, prompt_tokens, output_tokens)
    step_s = gpu.step_s(batch, 0, batch * context_of(prompt_tokens, output_tokens))
    joins = (batch - 1) * gpu.prefill_join_s  # each start joins the others decoding
    return steps * step_s + batch * (prompt_tokens * gpu.prefill_s_per_token + joins)


def capacity_rps(pool: BackendPool, prompt_tokens: float, output_tokens: float) -> float:
    """Requests per second the whole pool completes at a full batch."""
    if pool.count == 0:
        return 0.0
    seconds = request_time_s(pool.gpu, prompt_tokens, output_tokens)
    batch = full_batch(pool.gpu, prompt_tokens, output_tokens)
    return math.inf if seconds == 0 else pool.count * batch / seconds
