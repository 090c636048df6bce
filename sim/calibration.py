"""Fitting the simulator's backend model (`GpuConfig`) to measurements of a real engine.

Why fit through the model itself: a measured point is a burst of `concurrency` requests sent
at once, each with the same prompt and output size; the prediction for it is the same burst
run through `GpuModel`, so queueing beyond the batch, prefill and decode are predicted by the
very rules the simulator uses, and the error per point is the simulator's own error.

The fit, given the points:
- `max_batch` is the engine's own count of running requests, the largest its metrics showed
  during a burst that asked for more (llama.cpp's `requests_processing`, vLLM's
  `num_requests_running`, SGLang's `num_running_reqs`, TGI's `batch_current_size`); without
  such metrics, the concurrency beyond which throughput stops growing (from the throughputs
  alone: choosing the batch that minimised the timing error instead picked 8 for an engine of
  4 slots once, on a noisy machine, and overestimated its capacity by half; two noisy bursts
  can still move the knee by a factor of 2, which is why the metrics come first);
- the decode costs come from a least-squares fit of time per output token against
  n = min(concurrency, max_batch) and n x context (the attention's cost per KV token: a decode
  step after a 206-token prompt was measured 20-35 % slower than after a 62-token one on
  llama.cpp), over the bursts of two or more sequences, with a lone sequence's step
  (`decode_alone_s`) from the bursts of one (llama.cpp on a CPU: 3.3 ms a token alone, 6.1 ms
  for two, 7.9 ms for four, where a line through all three was 19-50 % too fast at two; with
  a batch of 2, a line through one and two put both 24-85 % over), and the prefill terms
  (steps per prompt token, seconds per prompt token in the batch) from the first-token times
  of the bursts that fit in the batch, in one of two forms (`_prefill_terms`): the bursts
  can hardly tell them apart, so the form is the one whose whole fit, the joins' first
  tokens included, errs least;
- `prefill_join_s` from the joins: a prompt sent while `decoding` sequences are past their
  first token, its first-token time against the model's without a join cost (a burst into an
  idle engine never shows that cost; a steady stream of arrivals pays it on every start);
- `kv_capacity_tokens` and `max_waiting` are not timings: they come from the engine's metrics
  when it tells them (the caller passes them), else stay at the model's defaults.

Pure: measurements in, a `Fit` out; no I/O, no clock.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from scheduler.models.gpu import GpuConfig, GpuModel, context_of

SATURATION_GAIN = 0.05  # throughput that grows by less than this is no longer growing
MAX_PREFILL_TOKENS_PER_STEP = 2048.0  # a real engine's batch (llama.cpp's n_batch)


@dataclass(frozen=True, slots=True)
class Point:
    """One measured burst: `concurrency` requests at once, `prompt_tokens` each (as the engine
    counted them), `output_tokens` each; the mean time to first token and per output token."""

    concurrency: int
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_s: float
    throughput_tps: float  # output tokens per second over the burst


@dataclass(frozen=True, slots=True)
class JoinPoint:
    """One measured join: a prompt of `prompt_tokens` sent once `decoding` requests of
    `running_prompt_tokens` and `running_output_tokens` each had their first token; its
    median time to first token."""

    decoding: int
    prompt_tokens: int
    running_prompt_tokens: int
    running_output_tokens: int
    ttft_s: float


@dataclass(frozen=True, slots=True)
class JoinError:
    point: JoinPoint
    ttft_s: float  # predicted

    @property
    def ttft_error(self) -> float:
        return abs(self.ttft_s - self.point.ttft_s) / self.point.ttft_s


@dataclass(frozen=True, slots=True)
class PointError:
    point: Point
    ttft_s: float  # predicted
    tpot_s: float  # predicted

    @property
    def ttft_error(self) -> float:
        return abs(self.ttft_s - self.point.ttft_s) / self.point.ttft_s

    @property
    def tpot_error(self) -> float:
        return abs(self.tpot_s - self.point.tpot_s) / self.point.tpot_s


@dataclass(frozen=True, slots=True)
class Fit:
    gpu: GpuConfig
    errors: tuple[PointError, ...]
    saturation_concurrency: int
    join_errors: tuple[JoinError, ...] = ()

    @property
    def mean_error(self) -> float:
        every = [e.ttft_error for e in self.errors] + [e.tpot_error for e in self.errors]
        every += [e.ttft_error for e in self.join_errors]
        return sum(every) / len(every) if every else math.nan


def predict_burst(gpu: GpuConfig, point: Point) -> PointError:
    """The model's mean first-token time and time per output token for `point`'s burst."""
    model = GpuModel(gpu)
    seqs = [
        model.submit(i, point.prompt_tokens, point.output_tokens, now=0.0)
        for i in range(point.concurrency)
    ]
    done = [s for s in seqs if s is not None]
    while model.running or model.waiting:
        model.advance(model.next_event_at())
    ttft = [s.first_token_at - s.submitted_at for s in done]
    tpot = [
        (s.finished_at - s.first_token_at) / (s.output_tokens - 1)
        for s in done
        if s.output_tokens > 1
    ]
    return PointError(point, _mean(ttft), _mean(tpot))


def predict_join(gpu: GpuConfig, point: JoinPoint) -> float:
    """The model's first-token time for `point`'s joining prompt: the running requests start
    together, and the prompt comes when the last of them has its first token."""
    model = GpuModel(gpu)
    running = [
        model.submit(i, point.running_prompt_tokens, point.running_output_tokens, now=0.0)
        for i in range(point.decoding)
    ]
    while any(s is not None and math.isnan(s.first_token_at) for s in running):
        model.advance(model.next_event_at())
    at = max((s.first_token_at for s in running if s is not None), default=0.0)
    joiner = model.submit(point.decoding, point.prompt_tokens, 2, now=at)
    if joiner is None:
        return math.nan
    while math.isnan(joiner.first_token_at):
        model.advance(model.next_event_at())
    return joiner.first_token_at - at


def _join_term(joins: Sequence[JoinPoint], gpu: GpuConfig) -> GpuConfig:
    """`prefill_join_s`: what the joins' first tokens took beyond the model's without it, over
    what one second of join cost adds to them (the model is linear in it, nearly)."""
    if not joins or gpu.prefill_s_per_token == 0:
        return gpu
    probe = 0.001
    with_probe = replace(gpu, prefill_join_s=probe)
    shares = []
    for j in joins:
        without = predict_join(gpu, j)
        slope = (predict_join(with_probe, j) - without) / probe
        if slope > 0 and not math.isnan(without):
            shares.append((j.ttft_s - without) / slope)
    if not shares:
        return gpu
    return replace(gpu, prefill_join_s=max(0.0, statistics.median(shares)))


def saturation_concurrency(points: Sequence[Point]) -> int:
    """The concurrency beyond which throughput stops growing (by SATURATION_GAIN): for each
    prompt length the lowest concurrency within that of its best throughput; the largest."""
    knees = []
    for prompt in {p.prompt_tokens for p in points}:
        same = sorted((p for p in points if p.prompt_tokens == prompt), key=_by_concurrency)
        top = max(p.throughput_tps for p in same)
        knees.append(
            next(p.concurrency for p in same if p.throughput_tps >= top * (1 - SATURATION_GAIN))
        )
    return max(knees)


def _by_concurrency(point: Point) -> int:
    return point.concurrency


def fit(
    points: Sequence[Point],
    *,
    kv_capacity_tokens: int | None = None,
    max_waiting: int | None = None,
    max_batch: int | None = None,
    joins: Sequence[JoinPoint] = (),
) -> Fit:
    """The `GpuConfig` that reproduces `points` and `joins` best (see the module's docstring);
    `max_batch` when the engine's metrics told it (`running_from_metrics`)."""
    if not points:
        raise ValueError("no measurements to fit")
    base = GpuConfig()
    base = replace(
        base,
        kv_capacity_tokens=kv_capacity_tokens or base.kv_capacity_tokens,
        max_waiting=base.max_waiting if max_waiting is None else max_waiting,
    )
    knee = saturation_concurrency(points)
    fits = [
        Fit(
            gpu,
            tuple(predict_burst(gpu, p) for p in points),
            knee,
            tuple(JoinError(j, predict_join(gpu, j)) for j in joins),
        )
        for bursts in _fit_bursts(points, replace(base, max_batch=max_batch or knee))
        for gpu in (_join_term(joins, bursts),)
    ]
    return min(fits, key=_by_error)


def _by_error(fit: Fit) -> float:
    return fit.mean_error


def _fit_bursts(points: Sequence[Point], gpu: GpuConfig) -> list[GpuConfig]:
    """The decode terms, and each form of the prefill terms that fits the bursts."""
    gpu = _decode_terms(points, gpu)
    # a burst of c inside the batch: TTFT - step_s(c) = prompt / rate * step_s(c)
    #   + c * prompt * prefill_s_per_token (all c prompts are prefilled before any first token)
    samples = [
        (p.prompt_tokens * step_s, p.concurrency * p.prompt_tokens, p.ttft_s - step_s, p.ttft_s)
        for p in points
        if p.concurrency <= gpu.max_batch and p.prompt_tokens > 0
        for step_s in (_burst_step_s(gpu, p),)
    ]
    return [
        replace(gpu, prefill_tokens_per_step=1 / per_step, prefill_s_per_token=per_token)
        for per_step, per_token in _prefill_terms(samples)
    ]


def _burst_step_s(gpu: GpuConfig, p: Point) -> float:
    """A decode step's time while `p`'s whole burst runs (the prefill costs aside)."""
    context = p.concurrency * context_of(p.prompt_tokens, p.output_tokens)
    return gpu.step_s(p.concurrency, 0, context)


def _decode_terms(points: Sequence[Point], gpu: GpuConfig) -> GpuConfig:
    """decode_base_s, decode_per_seq_s and decode_per_kv_token_s from the times per output
    token: a plane in (n, n x context) where both are known, else a line. Where bursts of
    one and of two or more were measured, the plane is the latter's, and a lone sequence's
    step (`decode_alone_s`) is what its bursts of one took, less their context's cost."""
    rows = [
        (n, n * context_of(p.prompt_tokens, p.output_tokens), p.tpot_s)
        for p in points
        if not math.isnan(p.tpot_s)
        for n in (min(p.concurrency, gpu.max_batch),)
    ]
    several = [row for row in rows if row[0] >= 2]
    alone = [row for row in rows if row[0] == 1]
    if not alone or not several:
        return _decode_plane(rows, gpu)
    fitted = _decode_plane(several, gpu)
    lone_s = _mean([y - fitted.decode_per_kv_token_s * context for _, context, y in alone])
    return replace(fitted, decode_alone_s=max(0.0, lone_s))


def _decode_plane(rows: Sequence[tuple[float, float, float]], gpu: GpuConfig) -> GpuConfig:
    """The decode terms of `rows` (n, n x context, time per token)."""
    plane = _plane(rows)
    if plane is not None:
        base, per_seq, per_kv = plane
        return replace(
            gpu, decode_base_s=base, decode_per_seq_s=per_seq, decode_per_kv_token_s=per_kv
        )
    if len({n for n, _, _ in rows}) == 1:  # one batch size (a batch of 2): its step, its context
        per_kv, base = _line([(context, y) for _, context, y in rows])
        return replace(gpu, decode_base_s=base, decode_per_seq_s=0.0, decode_per_kv_token_s=per_kv)
    slope, intercept = _line([(n, y) for n, _, y in rows])
    return replace(gpu, decode_base_s=intercept, decode_per_seq_s=slope)


def _plane(rows: Sequence[tuple[float, float, float]]) -> tuple[float, float, float] | None:
    """Non-negative (a, b, c) minimising the squared relative error of y = a + b x1 + c x2,
    or None when the rows do not pin it down or a term comes out negative."""
    w = [1 / (y * y) if y > 0 else 0.0 for *_, y in rows]
    columns = [[1.0, x1, x2] for x1, x2, _ in rows]
    ys = [y for *_, y in rows]
    normal = [
        [sum(wi * c[i] * c[j] for wi, c in zip(w, columns, strict=True)) for j in range(3)]
        for i in range(3)
    ]
    rhs = [sum(wi * c[i] * y for wi, c, y in zip(w, columns, ys, strict=True)) for i in range(3)]
    solution = _solve3(normal, rhs)
    if solution is None or min(solution) < 0:
        return None
    return solution[0], solution[1], solution[2]


def _solve3(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Cramer's rule for a 3 x 3 system; None when it is (nearly) singular."""

    def det(a: list[list[float]]) -> float:
        return (
            a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
            - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
        )

    d = det(m)
    scale = math.prod(max(abs(x) for x in row) or 1.0 for row in m)
    if abs(d) <= 1e-12 * scale:
        return None
    result = []
    for k in range(3):
        replaced = [[v[i] if j == k else m[i][j] for j in range(3)] for i in range(3)]
        result.append(det(replaced) / d)
    return result


def _line(xy: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Non-negative slope and intercept minimising the squared relative error (weights
    1 / y^2), so a slow point does not outweigh the fast ones; a flat line for a single x,
    a line through the origin where the best intercept is negative."""
    w = [1 / (y * y) if y > 0 else 0.0 for _, y in xy]
    total = sum(w)
    if total == 0:
        return 0.0, 0.0
    mean_x = sum(wi * x for wi, (x, _) in zip(w, xy, strict=True)) / total
    mean_y = sum(wi * y for wi, (_, y) in zip(w, xy, strict=True)) / total
    sxx = sum(wi * (x - mean_x) ** 2 for wi, (x, _) in zip(w, xy, strict=True))
    if sxx == 0:
        return 0.0, mean_y
    sxy = sum(wi * (x - mean_x) * (y - mean_y) for wi, (x, y) in zip(w, xy, strict=True))
    if sxy <= 0:
        return 0.0, mean_y
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    if intercept < 0:
        through_origin = sum(wi * x * y for wi, (x, y) in zip(w, xy, strict=True))
        return through_origin / sum(wi * x * x for wi, (x, _) in zip(w, xy, strict=True)), 0.0
    return slope, intercept


def _prefill_terms(
    samples: Sequence[tuple[float, float, float, float]],
) -> list[tuple[float, float]]:
    """The two forms of a, b in y = a x1 + b x2, each a least squares of the relative error
    (each sample is (x1, x2, y, measured)): `a` at its floor, 1 / MAX_PREFILL_TOKENS_PER_STEP,
    with all the cost per token (llama.cpp's whole prompt in one step); and no cost per token,
    all of it in the steps a prompt takes at a fixed number of its tokens a step. `fit`
    chooses between them by the joins' error as well as the bursts'.

    Not the two terms free together: the bursts can hardly tell them apart (a step's time
    grows with the burst, as its prompt tokens do), and such a mix fits their noise. On
    llama-server it once chose 54 prompt tokens a step at 0.51 ms each, within 1 % of the
    per-token form's error on the bursts and the joins; replayed, its long prompts took
    several steps, each one advancing every decoding sequence, where llama.cpp takes a prompt
    in one step: Free admitted 0.49 simulated against 0.30 live, where the per-token form
    gives 0.35 on the same arrivals (bench/FIDELITY.md, 2026-12-08 later)."""
    floor = 1 / MAX_PREFILL_TOKENS_PER_STEP
    if not samples:
        return [(floor, 0.0)]
    w = [1 / (m * m) for *_, m in samples]
    s11 = sum(wi * x1 * x1 for wi, (x1, _, _, _) in zip(w, samples, strict=True))
    s22 = sum(wi * x2 * x2 for wi, (_, x2, _, _) in zip(w, samples, strict=True))
    s12 = sum(wi * x1 * x2 for wi, (x1, x2, _, _) in zip(w, samples, strict=True))
    s1y = sum(wi * x1 * y for wi, (x1, _, y, _) in zip(w, samples, strict=True))
    s2y = sum(wi * x2 * y for wi, (_, x2, y, _) in zip(w, samples, strict=True))
    forms = [(floor, max(0.0, (s2y - floor * s12) / s22))]
    if s1y / s11 > floor:
        forms.append((s1y / s11, 0.0))
    return forms


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def kv_capacity_from_metrics(text: str) -> int | None:
    """The engine's KV cache size in tokens, when its Prometheus text tells it."""
    values: dict[str, float] = {}
    labels: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            values[name] = float(value)
        except ValueError:
            continue
        labels[name] = name_part
    if values.get("sglang:max_total_num_tokens"):
        return int(values["sglang:max_total_num_tokens"])
    if "vllm:cache_config_info" in labels:
        blocks = _label(labels["vllm:cache_config_info"], "num_gpu_blocks")
        size = _label(labels["vllm:cache_config_info"], "block_size")
        if blocks and size:
            return blocks * size
    ratio = values.get("llamacpp:kv_cache_usage_ratio", 0.0)
    if ratio > 0 and values.get("llamacpp:kv_cache_tokens"):
        return int(values["llamacpp:kv_cache_tokens"] / ratio)
    return None


RUNNING_GAUGES = (
    "llamacpp:requests_processing",
    "vllm:num_requests_running",
    "sglang:num_running_reqs",
    "tgi_batch_current_size",
)


def running_from_metrics(text: str) -> int | None:
    """How many requests the engine is running now, when its Prometheus text tells it (the
    sum over its series: vLLM labels one per model)."""
    total: float | None = None
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name_part, _, value = line.rpartition(" ")
        if name_part.split("{", 1)[0] not in RUNNING_GAUGES:
            continue
        try:
            total = (total or 0.0) + float(value)
        except ValueError:
            continue
    return None if total is None else int(total)


def _label(series: str, name: str) -> int | None:
    marker = f'{name}="'
    if marker not in series:
        return None
    value = series.split(marker, 1)[1].split('"', 1)[0]
    return int(value) if value.isdigit() else None


def backends_section(fit: Fit, *, comment: str = "") -> str:
    """The scenario's `[backends]` table for `fit` (one backend)."""
    gpu = fit.gpu
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [
        "[backends]",
        "count = 1",
        f"max_batch = {gpu.max_batch}",
        f"kv_capacity_tokens = {gpu.kv_capacity_tokens}",
        f"max_waiting = {gpu.max_waiting}",
        f"decode_base_s = {gpu.decode_base_s:.6g}",
        f"decode_per_seq_s = {gpu.decode_per_seq_s:.6g}",
        f"prefill_tokens_per_step = {gpu.prefill_tokens_per_step:.6g}",
        f"prefill_s_per_token = {gpu.prefill_s_per_token:.6g}",
        f"decode_per_kv_token_s = {gpu.decode_per_kv_token_s:.6g}",
        f"prefill_join_s = {gpu.prefill_join_s:.6g}",
        f"decode_alone_s = {gpu.decode_alone_s:.6g}",
    ]
    return "\n".join(lines) + "\n"


def error_table(fit: Fit) -> list[tuple[str, ...]]:
    """Rows for `sim.report.format_table`: each point, measured, predicted, error; a join
    shows as `k+1` (k decoding, one joining) with no time per token."""
    joins: list[tuple[str, ...]] = [
        (
            f"{e.point.decoding}+1",
            str(e.point.prompt_tokens),
            f"{1000 * e.point.ttft_s:.1f}",
            f"{1000 * e.ttft_s:.1f}",
            f"{100 * e.ttft_error:.1f}%",
            "-",
            "-",
            "-",
            "-",
        )
        for e in fit.join_errors
    ]
    bursts: list[tuple[str, ...]] = [
        (
            str(e.point.concurrency),
            str(e.point.prompt_tokens),
            f"{1000 * e.point.ttft_s:.1f}",
            f"{1000 * e.ttft_s:.1f}",
            f"{100 * e.ttft_error:.1f}%",
            f"{1000 * e.point.tpot_s:.2f}",
            f"{1000 * e.tpot_s:.2f}",
            f"{100 * e.tpot_error:.1f}%",
            f"{e.point.throughput_tps:.0f}",
        )
        for e in fit.errors
    ]
    return bursts + joins


ERROR_COLUMNS = (
    "conc",
    "prompt",
    "ttft ms",
    "model",
    "error",
    "tpot ms",
    "model",
    "error",
    "tok/s",
)
