"""The time series: every `sample_s` of virtual time, what each tier offered, got admitted,
served within its SLO and lost since the last sample, with the controller's limit, pressure
and latency, the queue depths, and the p99 latency of what completed in the interval. With
several replicas, limits, in-flight and depths are their sums (the latency signal: the first
replica's).

Utilisation under demand: at each sample where some request is queued, the backends' running
sequences over their batch slots (the useful concurrency); its mean says whether the
controller holds back while there is work."""

from __future__ import annotations

from scheduler.core import Scheduler
from sim.engine.model import Spike
from sim.engine.results import SpikeResult, TimeSeries, percentile
from sim.engine.state import TierState


class Recorder:
    def __init__(self, sample_s: float, tiers: list[TierState]) -> None:
        self.series = TimeSeries(sample_s=sample_s)
        self.tiers = tiers
        self._seen = [0] * len(tiers)  # each tier's latencies recorded by the last sample
        self._busy: list[float] = []  # running / slots at the samples with a queue
        for ts in tiers:
            for column in (
                self.series.offered,
                self.series.admitted,
                self.series.goodput,
                self.series.shed,
                self.series.depth,
            ):
                column[ts.name] = []

    def sample(
        self,
        now: float,
        scheds: list[Scheduler],
        *,
        pressure: float,
        alive: int,
        running: int,
        slots: int,
    ) -> None:
        series = self.series
        all_stats = [s.statistics() for s in scheds]
        stats = all_stats[0]
        depths = dict.fromkeys((t.name for t in stats.queue.tiers), 0)
        for one in all_stats:
            for t in one.queue.tiers:
                depths[t.name] += t.depth
        if slots and any(depths.values()):
            self._busy.append(running / slots)
        series.t.append(now)
        series.limit.append(sum(s.controller.limit for s in all_stats))
        series.pressure.append(pressure)
        series.latency_signal_s.append(stats.controller.latency_s)
        recent: list[float] = []
        for i, ts in enumerate(self.tiers):
            recent.extend(ts.latencies[self._seen[i] :])
            self._seen[i] = len(ts.latencies)
        recent.sort()
        series.p99_latency_s.append(percentile(recent, 0.99))
        series.inflight.append(sum(s.gate.inflight for s in all_stats))
        series.backends_alive.append(alive)
        for ts in self.tiers:
            offered, admitted, goodput, not_served = ts.last
            ts.last = (ts.offered, ts.admitted, ts.goodput, ts.not_served())
            series.offered[ts.name].append(ts.offered - offered)
            series.admitted[ts.name].append(ts.admitted - admitted)
            series.goodput[ts.name].append(ts.goodput - goodput)
            series.shed[ts.name].append(ts.last[3] - not_served)
            series.depth[ts.name].append(depths[ts.name])

    def utilization(self) -> float:
        """Mean running / slots over the samples with a queue (nan when none had one)."""
        return sum(self._busy) / len(self._busy) if self._busy else float("nan")

    def spikes(self, spikes: tuple[Spike, ...], capacity_rps: float) -> tuple[SpikeResult, ...]:
        """Offered and goodput rates over the samples that lie inside each spike."""
        series = self.series
        step = series.sample_s
        results: list[SpikeResult] = []
        for spike in spikes:
            rows = [
                i
                for i, t in enumerate(series.t)
                if t - step >= spike.at_s - 1e-9 and t <= spike.end_s + 1e-9
            ]
            if not rows:
                continue
            span = len(rows) * step
            offered = sum(column[i] for column in series.offered.values() for i in rows)
            good = sum(column[i] for column in series.goodput.values() for i in rows)
            results.append(
                SpikeResult(spike.at_s, spike.end_s, offered / span, good / span, capacity_rps)
            )
        return tuple(results)
