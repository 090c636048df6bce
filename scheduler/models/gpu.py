"""A pure model of a GPU inference server with continuous batching.

Why a model and not a sleep: the demo backend and the simulator must behave alike, so the
latency and capacity rules live here once, as sans-IO code told the time.

The rules, close to what vLLM does:
- at most `max_batch` sequences run at once, and only while their KV cache (prompt plus
  output tokens) fits in `kv_capacity_tokens`; others wait in FIFO order, and beyond
  `max_waiting` a new request is refused (the server's 503);
- every running sequence advances one token per decode step, and a step takes
  `decode_base_s + decode_per_seq_s * running` seconds: more concurrent sequences, slower
  tokens for each, more tokens in total; a step of a lone sequence takes `decode_alone_s`
  instead when that is set (0, the default: it is not). llama.cpp on a CPU shows why: in most
  calibrations a second sequence nearly doubled the time per token (3.3 ms alone, 6.1 ms
  for two, 7.9 ms for four), which no line through all three follows;
- the prompt is prefilled in the same steps, at `prefill_tokens_per_step` prompt tokens per
  step, before the first output token; each prompt token costs the step that prefills it
  `prefill_s_per_token` more (0 by default). That is the cost a real engine shows (llama.cpp,
  vLLM's chunked prefill): a newcomer's prompt slows every running sequence's step, and a
  burst of prompts is paid for in total prompt tokens, not per sequence;
- attention reads every running sequence's KV cache at every step, so a step costs
  `decode_per_kv_token_s` more per token of context in the batch (0 by default). A
  sequence's context is counted as its prompt plus half its output (its mean over its life),
  so the step time changes only when a sequence starts or ends;
- a prompt that joins a batch in which other sequences are already decoding costs
  `prefill_join_s` more per decoding sequence (0 by default), paid as more prefill (so the
  whole batch waits for it). llama.cpp shows it: a 96-token prompt took 54 ms alone and 76 ms
  beside 3 decoding sequences, where one more sequence in a decode step costs ~1 ms (it
  splits such a batch into more passes over the weights); a burst of prompts into an idle
  engine never pays it, a steady stream of arrivals pays it on every start;
- the engine's own count of waiting requests (what its `/metrics` show) leaves out a request
  that arrived while a costed prompt was being prefilled, until that prompt's step ends: an
  engine takes new requests in between steps, and a step with a prompt in it is long.
  llama.cpp shows it (its `requests_deferred` lags a request posted during a prefill by the
  rest of that step), and so would any engine whose loop reads its input between steps; in
  front of a backend held at its limit, each freed slot starts a waiting prompt, so the request
  sent in its place nearly always lands in such a step.

Since all running sequences advance at the same rate, the model keeps one "step counter"
that grows at 1 / step_time(running) per second; a sequence's first token and end are fixed
points on that counter, kept in heaps (the processor-sharing trick): O(log n) per event.
The step time is kept, recomputed whenever the batch changes (a start, an end, a prompt
done, a cancel or new rules), since every question about time asks it. A cancel takes the
sequence's entries out of the heaps at once (a rare event, O(batch)), so every head is live.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, replace

_INF = math.inf


TIME_TERMS = (  # GpuConfig's terms in seconds (each >= 0)
    "decode_base_s",
    "decode_per_seq_s",
    "prefill_s_per_token",
    "decode_per_kv_token_s",
    "prefill_join_s",
    "decode_alone_s",
)


@dataclass(frozen=True, slots=True)
class GpuConfig:
    max_batch: int = 32
    kv_capacity_tokens: int = 65_536
    max_waiting: int = 256
    decode_base_s: float = 0.010
    decode_per_seq_s: float = 0.001
    prefill_tokens_per_step: float = 512.0
    prefill_s_per_token: float = 0.0
    decode_per_kv_token_s: float = 0.0
    prefill_join_s: float = 0.0
    decode_alone_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_batch", "kv_capacity_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"backend.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ValueError(f"backend.max_waiting must be >= 0, got {self.max_waiting}")
        for name in TIME_TERMS:
            if getattr(self, name) < 0:
                raise ValueError(f"backend.{name} must be >= 0, got {getattr(self, name)}")
        if self.prefill_join_s > 0 and self.prefill_s_per_token == 0:
            raise ValueError("backend.prefill_join_s needs backend.prefill_s_per_token > 0")
        if not self.prefill_tokens_per_step > 0:
            raise ValueError(
                f"backend.prefill_tokens_per_step must be > 0, got {self.prefill_tokens_per_step}"
            )

    def step_s(self, running: int, prefilling: int = 0, context_tokens: float = 0.0) -> float:
        """Seconds per step with `running` sequences in the batch, `prefilling` of them still
        in their prompt, and `context_tokens` of KV cache read by the batch's attention."""
        prefill_s = self.prefill_tokens_per_step * self.prefill_s_per_token
        if running == 1:
            decode_s = self.lone_decode_s
        else:
            decode_s = self.decode_base_s + self.decode_per_seq_s * running
        return decode_s + prefill_s * prefilling + self.decode_per_kv_token_s * context_tokens

    def scaled(self, factor: float) -> GpuConfig:
        """The same engine with every time term times `factor` (slower above 1)."""
        return replace(self, **{name: factor * getattr(self, name) for name in TIME_TERMS})

    @property
    def lone_decode_s(self) -> float:
        """A lone sequence's decode step: `decode_alone_s`, or the line's at one when unset."""
        return self.decode_alone_s or self.decode_base_s + self.decode_per_seq_s


def _step_terms(config: GpuConfig) -> tuple[float, float, float, float, float]:
    """`config.step_s`'s terms, so that the model sums them inline in the same order (the
    step time is set at every start and end): the base, per sequence, per prompt being
    prefilled, per token of context, and a lone sequence's decode."""
    return (
        config.decode_base_s,
        config.decode_per_seq_s,
        config.prefill_tokens_per_step * config.prefill_s_per_token,
        config.decode_per_kv_token_s,
        config.lone_decode_s,
    )


def context_of(prompt_tokens: float, output_tokens: float) -> float:
    """A sequence's KV context as the step time counts it: its mean over the sequence's life."""
    return prompt_tokens + output_tokens / 2


class Sequence:
    """One request inside the model. Times are set when they become known."""

    __slots__ = (
        "context",
        "done_step",
        "finished_at",
        "first_step",
        "first_token_at",
        "id",
        "kv_tokens",
        "output_tokens",
        "prefilled_step",
        "prompt_tokens",
        "seen_at",
        "start_step",
        "started_at",
        "submitted_at",
    )

    def __init__(self, seq_id: int, prompt_tokens: int, output_tokens: int, now: float) -> None:
        self.id = seq_id
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.kv_tokens = prompt_tokens + output_tokens
        self.context = prompt_tokens + output_tokens / 2  # context_of, inline: per request
        self.submitted_at = now
        self.seen_at = now  # when the engine's own metrics count it as waiting
        self.started_at = math.nan
        self.first_token_at = math.nan
        self.finished_at = math.nan
        self.start_step = math.nan
        self.first_step = math.nan
        self.prefilled_step = math.nan
        self.done_step = math.nan


@dataclass(frozen=True, slots=True)
class GpuStats:
    running: int
    waiting: int
    kv_used_tokens: int
    kv_usage: float  # 0..1, vLLM's kv_cache_usage_perc
    waiting_seen: int  # what the engine's metrics show as waiting (`GpuModel.waiting_seen`)
    step_s: float
    started: int
    finished: int
    refused: int


class GpuModel:
    """Continuous batching in virtual or real time: `submit`, then `advance(now)` to learn
    what started, produced its first token, or finished."""

    def __init__(self, config: GpuConfig, *, now: float = 0.0) -> None:
        self.config = config
        self._now = now
        self._step = 0.0  # the step counter, at time self._now
        self._running: dict[int, Sequence] = {}
        self._waiting: deque[Sequence] = deque()
        self._firsts: list[tuple[float, int, Sequence]] = []
        self._ends: list[tuple[float, int, Sequence]] = []
        self._prefills: list[tuple[float, int, Sequence]] = []  # ends of prompts, when costed
        self._prefilling: set[int] = set()
        self._kv_used = 0
        self._context = 0.0  # context_of() summed over the running sequences
        self._step_s = 0.0  # seconds per step of the current batch (`_restep`)
        self._step_terms = _step_terms(config)
        self._started = self._finished = self._refused = 0
        self._restep()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_usage(self) -> float:
        """0..1 of the KV cache in use (vLLM's kv_cache_usage_perc), as `statistics()` has it."""
        return self._kv_used / self.config.kv_capacity_tokens

    def submit(
        self, seq_id: int, prompt_tokens: int, output_tokens: int, *, now: float
    ) -> Sequence | None:
        """Accept a request (it runs or waits), or None when the waiting room is full or the
        request could never fit in the KV cache."""
        self.advance(now)
        seq = Sequence(
            seq_id,
            prompt_tokens if prompt_tokens > 0 else 0,
            output_tokens if output_tokens > 1 else 1,
            now,
        )
        config, waiting = self.config, self._waiting
        if seq.kv_tokens > config.kv_capacity_tokens or (
            len(waiting) >= config.max_waiting and (waiting or not self._fits(seq))
        ):
            self._refused += 1
            return None
        if self._prefills:  # taken in when the step in progress, a prompt's, ends
            seq.seen_at = self.time_of_step(self._prefills[0][0])
        waiting.append(seq)
        self._start_waiting()
        return seq

    def cancel(self, seq: Sequence, *, now: float) -> None:
        """The client went away: free its slot (a no-op if it already finished)."""
        self.advance(now)
        if seq.id in self._running:
            del self._running[seq.id]
            self._prefilling.discard(seq.id)
            self._release(seq)
            for heap in (self._prefills, self._firsts, self._ends):
                heap[:] = [item for item in heap if item[2] is not seq]
                heapq.heapify(heap)  # (step, id) orders the heap whatever its layout
            seq.finished_at = now
            self._start_waiting()
        elif seq in self._waiting:
            self._waiting.remove(seq)
            seq.finished_at = now

    def reconfigure(self, config: GpuConfig, *, now: float) -> None:
        """Change the rules from `now` on. Tokens already produced keep their times; running
        sequences are never evicted (a smaller batch or cache only stops new starts), and a
        larger one starts waiting sequences at once."""
        self.advance(now)
        self.config = config
        self._step_terms = _step_terms(config)
        self._start_waiting()

    def _fits(self, seq: Sequence) -> bool:
        return (
            len(self._running) < self.config.max_batch
            and self._kv_used + seq.kv_tokens <= self.config.kv_capacity_tokens
        )

    def _start_waiting(self) -> None:
        """Start what fits from the waiting room (`_fits`), then set the step time of the
        batch (`_restep`); both inline, as this runs at every start and end."""
        waiting, config, running = self._waiting, self.config, self._running
        if waiting:
            step, now, push = self._step, self._now, heapq.heappush
            max_batch, kv_capacity = config.max_batch, config.kv_capacity_tokens
            # a join's cost as prompt tokens, per sequence decoding when the newcomers start:
            # past its prompt before this step, and not ending at it (a wave that ends
            # together is followed by one that starts together, into an idle batch)
            join_tokens = 0.0
            if config.prefill_join_s > 0:
                decoding = sum(
                    1 for seq in running.values() if seq.prefilled_step < step < seq.done_step
                )
                join_tokens = decoding * config.prefill_join_s / config.prefill_s_per_token
            while waiting:
                seq = waiting[0]
                if len(running) >= max_batch or self._kv_used + seq.kv_tokens > kv_capacity:
                    break
                waiting.popleft()
                seq.started_at = now
                seq.start_step = step
                prompt = seq.prompt_tokens + join_tokens
                prefilled = step + prompt / config.prefill_tokens_per_step
                seq.prefilled_step = prefilled
                seq.first_step = first = prefilled + 1
                seq.done_step = done = first + seq.output_tokens - 1
                running[seq.id] = seq
                if config.prefill_s_per_token > 0 and prompt > 0:
                    self._prefilling.add(seq.id)
                    push(self._prefills, (prefilled, seq.id, seq))
                self._kv_used += seq.kv_tokens
                self._context += seq.context
                self._started += 1
                push(self._firsts, (first, seq.id, seq))
                push(self._ends, (done, seq.id, seq))
        base, per_seq, prefill_s, per_kv, alone = self._step_terms  # config.step_s, inline
        n = len(running)
        self._step_s = (
            (alone if n == 1 else base + per_seq * n)
            + prefill_s * len(self._prefilling)
            + per_kv * self._context
        )

    def _release(self, seq: Sequence) -> None:
        self._kv_used -= seq.kv_tokens
        self._context -= seq.context
        if not self._running:
            self._context = 0.0  # no float residue left behind

    def _restep(self) -> None:
        base, per_seq, prefill_s, per_kv, alone = self._step_terms  # config.step_s, inline
        n = len(self._running)
        self._step_s = (
            (alone if n == 1 else base + per_seq * n)
            + prefill_s * len(self._prefilling)
            + per_kv * self._context
        )

    def step_at(self, now: float) -> float:
        """The step counter at `now` if nothing starts or ends before then."""
        step_s = self._step_s
        if not self._running or step_s == 0:
            return math.inf if self._running else self._step
        return self._step + (now - self._now) / step_s

    def time_of_step(self, step: float) -> float:
        """When the counter reaches `step` at the current batch size."""
        if step <= self._step:
            return self._now
        return self._now + (step - self._step) * self._step_s

    def next_event_at(self) -> float:
        """When the next first token or completion is due (`math.inf` when idle)."""
        due = [h[0][0] for h in (self._prefills, self._firsts, self._ends) if h]
        return self.time_of_step(min(due)) if due else math.inf

    def next_finish_at(self) -> float:
        """When the next running sequence finishes at the current batch size, or sooner when
        a costed prompt is done and steps speed up (`math.inf` if neither is pending): a
        caller that wakes only for completions must wake then too, or it wakes late."""
        ends, prefills = self._ends, self._prefills
        if ends:  # time_of_step, inline
            step = ends[0][0]
            finish_at = (
                self._now if step <= self._step else self._now + (step - self._step) * self._step_s
            )
        else:
            finish_at = math.inf
        if prefills:
            return min(finish_at, self.time_of_step(prefills[0][0]))
        return finish_at

    def advance(self, now: float) -> list[Sequence]:
        """Move to `now`; returns the sequences that finished, in order. First-token times
        are filled in on the sequences as they pass.

        The clock (`_now`, `_step`) moves to each event in turn, as it is what the next
        event's time is computed from; it is kept in locals and written back only where
        `_start_waiting` reads it (a finish or a prompt's end: first tokens change nothing
        else, and are most of the events)."""
        finished: list[Sequence] = []
        prefills, firsts, ends, pop = self._prefills, self._firsts, self._ends, heapq.heappop
        t, s, step_s = self._now, self._step, self._step_s
        while True:
            # The earliest head of the three heaps; of equal steps, a prompt's end comes
            # first, then a first token, then a finish.
            p = prefills[0][0] if prefills else _INF
            e = ends[0][0] if ends else _INF
            if firsts and firsts[0][0] < p and firsts[0][0] <= e:
                heap, step = firsts, firsts[0][0]
            elif e < p:
                heap, step = ends, e
            elif prefills:
                heap, step = prefills, p
            else:
                break
            at = t if step <= s else t + (step - s) * step_s
            if at > now:
                break
            t, s = at, step
            seq = pop(heap)[2]
            if heap is firsts:
                seq.first_token_at = at
                continue
            self._now, self._step = t, s
            if heap is ends:
                seq.finished_at = at
                running = self._running
                del running[seq.id]
                self._kv_used -= seq.kv_tokens  # _release, inline
                self._context = self._context - seq.context if running else 0.0
                self._finished += 1
                finished.append(seq)
                self._start_waiting()
            else:
                self._prefilling.discard(seq.id)
                self._restep()
            step_s = self._step_s
        if now > t:
            if self._running:  # step_at, inline
                s = _INF if step_s == 0 else s + (now - t) / step_s
            t = now
        self._now, self._step = t, s
        return finished

    def waiting_seen(self, now: float) -> int:
        """The waiting the engine's own metrics show at `now`: those that arrived during a
        prompt's step and wait beyond it count once that step is over. They are the most
        recent arrivals, at the end of the waiting room."""
        unseen = 0
        for seq in reversed(self._waiting):
            if seq.seen_at <= now:
                break
            unseen += 1
        return len(self._waiting) - unseen

    def tokens_done(self, seq: Sequence, *, now: float) -> int:
        """Output tokens `seq` has produced by `now` (after `advance(now)`)."""
        if not math.isnan(seq.finished_at):
            return seq.output_tokens
        if math.isnan(seq.start_step):
            return 0
        step = self.step_at(now)
        return max(0, min(seq.output_tokens, math.floor(step - seq.first_step) + 1))

    def token_at(self, seq: Sequence, k: int) -> float:
        """When output token k (1-based) of a running `seq` is due at the current batch size."""
        return self.time_of_step(seq.first_step + k - 1)

    def statistics(self) -> GpuStats:
        return GpuStats(
            running=len(self._running),
            waiting=len(self._waiting),
            kv_used_tokens=self._kv_used,
            kv_usage=self._kv_used / self.config.kv_capacity_tokens,
            waiting_seen=self.waiting_seen(self._now),
            step_s=self._step_s,
            started=self._started,
            finished=self._finished,
            refused=self._refused,
        )
