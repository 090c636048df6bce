"""Arrival processes: when requests come, from which key, and how big they are.

Why this design: a non-homogeneous Poisson process is drawn segment by segment. Segments end
wherever the rate's shape changes (a spike starts or ends, a point of the diurnal curve), so
inside a segment the rate is linear: constant-rate segments need one exponential draw per
arrival, linear ones add Lewis-Shedler thinning against the segment's maximum. A draw that
runs past the segment's end restarts at the end (the exponential is memoryless), which keeps
the process exact. Arrivals are produced a window at a time and merged across tiers by the
engine, so the event heap never holds them.

Every tier draws from its own generator seeded by (seed, tier name): adding a tier or changing
one tier's traffic leaves the others' arrivals unchanged.
"""

from __future__ import annotations

import bisect
import math
import random
from itertools import accumulate, repeat
from statistics import NormalDist

from sim.engine.model import Diurnal, Process, SizeDist, SizeKind, Spike, TierSpec

ArrivalRow = tuple[float, int, int, int, int]
"""(at_s, tier index, key index, prompt tokens, output tokens)."""

_QUANTILES = 4096


class RateCurve:
    """rate(t) = base x diurnal(t) x the product of the spikes active at t."""

    def __init__(self, base_rps: float, spikes: tuple[Spike, ...], diurnal: Diurnal | None):
        self._base = base_rps
        self._spikes = spikes
        self._edges = sorted({s.at_s for s in spikes} | {s.end_s for s in spikes})
        self._diurnal = diurnal
        if diurnal is not None:
            points = sorted(diurnal.points)
            self._period = diurnal.period_s
            self._xs = [p[0] for p in points]
            self._ys = [p[1] for p in points]

    def _spike_factor(self, t: float) -> float:
        factor = 1.0
        for spike in self._spikes:
            if spike.at_s <= t < spike.end_s:
                factor *= spike.factor
        return factor

    def _diurnal_piece(self, t: float) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in absolute time: the linear piece of the curve around t."""
        period, xs, ys = self._period, self._xs, self._ys
        base = math.floor(t / period) * period
        phase = t - base
        i = bisect.bisect_right(xs, phase)
        if i == 0:  # before the first point: the piece wraps from the last point
            return base + xs[-1] - period, ys[-1], base + xs[0], ys[0]
        if i == len(xs):  # after the last point: wraps to the first of the next period
            return base + xs[-1], ys[-1], base + period + xs[0], ys[0]
        return base + xs[i - 1], ys[i - 1], base + xs[i], ys[i]

    def segment(self, t: float) -> tuple[float, float, float, float]:
        """(end, rate at t, slope, max rate) of the linear segment that starts at t."""
        j = bisect.bisect_right(self._edges, t)
        end = self._edges[j] if j < len(self._edges) else math.inf
        scale = self._base * self._spike_factor(t)
        if self._diurnal is None or len(self._xs) == 1:
            flat = scale * (self._ys[0] if self._diurnal is not None else 1.0)
            return end, flat, 0.0, flat
        x0, y0, x1, y1 = self._diurnal_piece(t)
        end = min(end, x1)
        slope = (y1 - y0) / (x1 - x0) if x1 > x0 else 0.0
        at_t = scale * (y0 + slope * (t - x0))
        at_end = scale * (y0 + slope * (end - x0))
        return end, at_t, scale * slope, max(at_t, at_end)


class _Sizes:
    """Draws token counts from one distribution, a window's worth at a time.

    Lognormal sizes come by inverse CDF from a table of `_QUANTILES` quantiles, a tenth of
    the cost of `lognormvariate`; the tail beyond the top quantile (0.012 %) is folded
    into it, which token counts, rounded and clamped anyway, do not notice.
    """

    def __init__(self, dist: SizeDist, rng: random.Random) -> None:
        self._dist = dist
        self._rng = rng
        self._fixed = min(dist.max, max(dist.min, round(dist.mean)))
        self._table: list[int] = []
        if dist.kind is SizeKind.LOGNORMAL:
            sigma = dist.sigma
            normal = NormalDist(math.log(dist.mean) - sigma * sigma / 2, sigma)
            self._table = [
                min(
                    dist.max, max(dist.min, round(math.exp(normal.inv_cdf((i + 0.5) / _QUANTILES))))
                )
                for i in range(_QUANTILES)
            ]

    def take(self, n: int) -> list[int]:
        dist, rng = self._dist, self._rng
        if dist.kind is SizeKind.LOGNORMAL:
            return rng.choices(self._table, k=n)
        if dist.kind is SizeKind.UNIFORM:
            return [rng.randint(dist.min, dist.max) for _ in range(n)]
        return [self._fixed] * n

    def draw(self) -> int:
        return self.take(1)[0]


class _Keys:
    """Zipf(s) over the tier's keys: key k is chosen with weight 1 / (k + 1) ** s."""

    def __init__(self, count: int, skew: float, rng: random.Random) -> None:
        self._population = range(count)
        self._cum = (
            None if skew == 0 else list(accumulate(1.0 / (k + 1) ** skew for k in range(count)))
        )
        self._rng = rng

    def take(self, n: int) -> list[int]:
        return self._rng.choices(self._population, cum_weights=self._cum, k=n)

    def draw(self) -> int:
        return self.take(1)[0]


class TierArrivals:
    """The arrivals of one tier, produced window by window until `duration_s`."""

    def __init__(
        self,
        index: int,
        tier: TierSpec,
        *,
        spikes: tuple[Spike, ...],
        diurnal: Diurnal | None,
        duration_s: float,
        seed: int,
    ) -> None:
        self.index = index
        self.tier = tier
        self._duration = duration_s
        rng = random.Random(f"{seed}/{tier.name}/arrivals")
        self._rng = rng
        mine = tuple(s for s in spikes if not s.tiers or tier.name in s.tiers)
        if diurnal is not None and diurnal.tiers and tier.name not in diurnal.tiers:
            diurnal = None
        self._curve = RateCurve(tier.arrivals.rate_rps, mine, diurnal)
        self._keys = _Keys(tier.keys, tier.key_skew, random.Random(f"{seed}/{tier.name}/keys"))
        self._prompt = _Sizes(tier.prompt_tokens, random.Random(f"{seed}/{tier.name}/prompt"))
        self._output = _Sizes(tier.output_tokens, random.Random(f"{seed}/{tier.name}/output"))
        self.key_names = [f"{tier.name}-{k}" for k in range(tier.keys)]
        self.prompt_tokens = self.output_tokens = 0  # totals over the arrivals produced
        self._key_index: dict[str, int] = {}
        self._trace_pos = 0
        self._is_trace = tier.arrivals.process is Process.TRACE
        self._seg_end = -math.inf
        self._seg_rate = self._seg_slope = self._seg_max = 0.0
        self._seg_start = 0.0
        self._t = 0.0
        self._next = self._draw_time() if not self._is_trace else math.inf

    def until(self, end_s: float, into: list[ArrivalRow]) -> None:
        """Append every arrival before `end_s` (and before the scenario's end) to `into`."""
        if self._is_trace:
            self._trace_until(end_s, into)
            return
        times = self._times_until(end_s)
        n = len(times)
        if n:
            prompts, outputs = self._prompt.take(n), self._output.take(n)
            self.prompt_tokens += sum(prompts)
            self.output_tokens += sum(outputs)
            into.extend(
                zip(times, repeat(self.index, n), self._keys.take(n), prompts, outputs, strict=True)
            )

    def _times_until(self, end_s: float) -> list[float]:
        times: list[float] = []
        append = times.append
        random_, log = self._rng.random, math.log
        t = self._next
        while t < end_s:
            append(t)
            if self._seg_slope == 0.0 and self._seg_max > 0:
                # Constant rate: draw on without thinning up to the segment's (or window's) end.
                stop = min(self._seg_end, end_s)
                mean_gap = 1.0 / self._seg_max
                t -= log(1.0 - random_()) * mean_gap
                while t < stop:
                    append(t)
                    t -= log(1.0 - random_()) * mean_gap
                if t >= self._seg_end:
                    self._t = self._seg_end  # memoryless: restart the draw at the segment's end
                    t = self._draw_time()
                else:
                    self._t = t
                continue
            self._t = t
            t = self._draw_time()
        self._next = t
        return times

    def _draw_time(self) -> float:
        """The next arrival after `self._t`, segment by segment (inf past the duration)."""
        rng = self._rng
        t = self._t
        while True:
            if t >= self._seg_end:
                if t >= self._duration:
                    self._t = math.inf
                    return math.inf
                self._seg_start = t
                end, self._seg_rate, self._seg_slope, self._seg_max = self._curve.segment(t)
                self._seg_end = min(end, self._duration)
            if self._seg_max <= 0:
                t = self._seg_end
                continue
            t += rng.expovariate(self._seg_max)
            if t >= self._seg_end:
                t = self._seg_end
                continue
            if self._seg_slope == 0.0:
                break
            rate = self._seg_rate + self._seg_slope * (t - self._seg_start)
            if rng.random() * self._seg_max <= rate:
                break
        self._t = t
        return t

    def _trace_until(self, end_s: float, into: list[ArrivalRow]) -> None:
        trace = self.tier.arrivals.trace
        pos = self._trace_pos
        while pos < len(trace) and trace[pos].at_s < end_s:
            record = trace[pos]
            pos += 1
            if record.at_s >= self._duration:
                pos = len(trace)
                break
            key = self._keys.draw() if record.key is None else self._trace_key(record.key)
            p = self._prompt.draw() if record.prompt_tokens is None else record.prompt_tokens
            o = self._output.draw() if record.output_tokens is None else record.output_tokens
            into.append((record.at_s, self.index, key, p, o))
            self.prompt_tokens += p
            self.output_tokens += o
        self._trace_pos = pos

    def _trace_key(self, key: str) -> int:
        index = self._key_index.get(key)
        if index is None:
            index = len(self.key_names)
            self.key_names.append(key)
            self._key_index[key] = index
        return index
