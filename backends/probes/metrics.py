"""GPU-pressure probes: scrape each backend's Prometheus `/metrics`, keep its pressure.

    MetricsProbe    one backend: `scrape_once(now)`, `run()` (a loop for the service nursery)
    PoolPressure    several probes (metrics or NVML) aggregated into the controller's pressure
    ProbeConfig     per backend (scheduler.models.pressure_config, buildable from TOML)

What the numbers mean lives in the pure `scheduler.models.pressure` (signals, saturation points,
staleness) and `scheduler.models.exposition` (the engines' and GPU exporters' names); this
module only fetches, parses and records.

A failed scrape is not an exception to the caller: it is recorded (`ScrapeError`, translated
from the HTTP client's errors here and nowhere else) and the model turns it into staleness, so the
probe's loop never dies of an upstream's trouble. An HTTP 404, 410 or 501 is not a failure: the
server publishes no metrics (llama.cpp's answer without `--metrics` is a 501), which the model
reports as `known=False` (pressure 0, left out of the pool's aggregate), and the probe logs a
WARNING once, with the server's own words; set `enabled = false` for such backends to skip the
probe altogether.

The pool's pressure is `scheduler.models.pressure.pool_pressure` over its probes' readings (the
mean by default, stale backends at 1.0, backends out of the pool's rotation left out), the same
function the simulator calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from backends.http.client import BackendError, BackendTimeout, HttpClient, bearer
from scheduler.errors import SchedulerError
from scheduler.models.exposition import Exporter, parse_scrape
from scheduler.models.pressure import (
    Aggregate,
    PressureConfig,
    PressureModel,
    PressureReading,
    Scrape,
    Signal,
    pool_pressure,
)
from scheduler.models.pressure_config import ProbeConfig, probe_config_from_mapping

__all__ = [
    "Aggregate",
    "Exporter",
    "MetricsProbe",
    "ModelProbe",
    "PoolPressure",
    "PoolPressureStatistics",
    "PressureConfig",
    "PressureProbe",
    "PressureReading",
    "ProbeConfig",
    "Scrape",
    "ScrapeError",
    "Signal",
    "probe_config_from_mapping",
]

_ACCEPT = {"accept": "text/plain;version=0.0.4"}
_NO_METRICS = frozenset({404, 410, 501})
log = logging.getLogger("scheduler.service.pressure")


class ScrapeError(SchedulerError):
    """A scrape brought no data: unreachable, timed out, an error status, or not Prometheus
    text. Recorded by the probe, never raised out of it."""


class PressureProbe(Protocol):
    """What a pool needs of a probe."""

    @property
    def name(self) -> str: ...

    def reading(self, now: float) -> PressureReading: ...

    async def run(self, interval_s: float | None = None) -> None: ...


class ModelProbe:
    """The part every probe shares: a `PressureModel` fed by `_scrape`, and the loop."""

    def __init__(self, name: str, pressure: PressureConfig, interval_s: float) -> None:
        self._name = name
        self.model = PressureModel(pressure)
        self._interval_s = interval_s

    @property
    def name(self) -> str:
        return self._name

    async def _scrape(self, now: float) -> Scrape:
        raise NotImplementedError

    async def scrape_once(self, now: float) -> PressureReading:
        """Scrape now and record the result (a failure included); the reading after it."""
        try:
            scrape = await self._scrape(now)
        except ScrapeError as exc:
            self.model.observe_failure(str(exc))
        else:
            self.model.observe(scrape)
        return self.model.reading(now=now)

    def pressure(self, now: float) -> float:
        return self.model.pressure(now=now)

    def reading(self, now: float) -> PressureReading:
        return self.model.reading(now=now)

    async def run(self, interval_s: float | None = None) -> None:
        """Scrape every `interval_s` (the config's by default) until cancelled. A scrape
        slower than the interval delays the next one rather than piling up."""
        interval_s = self._interval_s if interval_s is None else interval_s
        next_at = trio.current_time()
        while True:
            await self.scrape_once(trio.current_time())
            next_at = max(next_at + interval_s, trio.current_time())
            await trio.sleep_until(next_at)


class MetricsProbe(ModelProbe):
    """Scrapes the Prometheus `/metrics` of the backend at `url` (its base URL, as in the
    model's backend list; `config.metrics_url` overrides where the metrics are). Its name is
    the backend's URL unless `name` says otherwise (a second probe of the same backend)."""

    def __init__(
        self,
        url: str,
        client: HttpClient,
        config: ProbeConfig | None = None,
        *,
        name: str | None = None,
        api_key: str = "",
    ) -> None:
        config = config or ProbeConfig()
        super().__init__(name or url.rstrip("/"), config.pressure, config.interval_s)
        self.config = config
        self.metrics_url = config.url_for(url)
        self._client = client
        self._headers = {**_ACCEPT, **bearer(api_key)}
        self._told_no_metrics = False

    async def _scrape(self, now: float) -> Scrape:
        text = await self._fetch()
        if text is None:
            return Scrape(at=now)  # no metrics published: known=False
        try:
            return parse_scrape(text, at=now, exporters=self.config.exporters)
        except ValueError as exc:
            raise ScrapeError(f"{self.metrics_url}: not Prometheus text ({exc})") from exc

    async def _fetch(self) -> str | None:
        """The metrics text, None when the server publishes none (`_NO_METRICS`); the
        client's errors become ScrapeError here."""
        try:
            status, body = await self._client.get(
                self.metrics_url, headers=self._headers, timeout_s=self.config.timeout_s
            )
        except BackendTimeout as exc:
            raise ScrapeError(f"{self.metrics_url}: timed out") from exc
        except BackendError as exc:
            raise ScrapeError(f"{self.metrics_url}: {type(exc).__name__}: {exc}") from exc
        if status in _NO_METRICS:
            self._tell_no_metrics(status, body)
            return None
        if status != 200:
            raise ScrapeError(f"{self.metrics_url}: HTTP {status}")
        self._told_no_metrics = False  # should they go again, say so again
        return body.decode("utf-8", "replace")

    def _tell_no_metrics(self, status: int, body: bytes) -> None:
        if self._told_no_metrics:
            return
        self._told_no_metrics = True
        said = " ".join(body[:300].decode("utf-8", "replace").split())
        log.warning(
            "backend %s publishes no metrics (%s: HTTP %d%s): its pressure is unknown and "
            "left out; publish them, or set enabled = false under the model's pressure",
            self.name,
            self.metrics_url,
            status,
            f", {said!r}" if said else "",
        )


@dataclass(frozen=True, slots=True)
class PoolPressureStatistics:
    pressure: float  # what the controller sees
    aggregate: Aggregate
    backends: dict[str, PressureReading]  # by probe name (the backend's URL)
    out_of_rotation: frozenset[str]  # probe names left out of `pressure`


def _always_routed(name: str) -> bool:
    return True


class PoolPressure:
    """The pressure of a pool of backends, from one probe each (or more: a vLLM probe and a
    DCGM probe of the same machine are two probes). Backends that are fresh but show no
    known signal are left out; with none left, the pressure is 0.0. `in_rotation(name)` says
    whether the pool routes to the backend a probe is named after (the pool's health: see
    `BackendPool.in_rotation`); the probes of those it does not are left out."""

    def __init__(
        self,
        probes: Sequence[PressureProbe],
        *,
        aggregate: Aggregate = Aggregate.MEAN,
        in_rotation: Callable[[str], bool] = _always_routed,
    ) -> None:
        names = [probe.name for probe in probes]
        if len(set(names)) != len(names):
            raise ValueError(f"pressure probes need distinct names, got {names}")
        self.probes = list(probes)
        self.aggregate = aggregate
        self._in_rotation = in_rotation

    @classmethod
    def for_backends(
        cls,
        configs: Sequence[tuple[str, ProbeConfig]],
        client: HttpClient,
        *,
        aggregate: Aggregate = Aggregate.MEAN,
        in_rotation: Callable[[str], bool] = _always_routed,
        api_key: str = "",
    ) -> PoolPressure:
        """A `MetricsProbe` for each (backend URL, config) whose config is enabled, sending
        `api_key` (the backends' own, as `HttpBackend` does)."""
        probes = [
            MetricsProbe(url, client, cfg, api_key=api_key) for url, cfg in configs if cfg.enabled
        ]
        return cls(probes, aggregate=aggregate, in_rotation=in_rotation)

    def _readings(self, now: float) -> tuple[list[PressureReading], list[bool]]:
        probes = self.probes
        return [p.reading(now) for p in probes], [self._in_rotation(p.name) for p in probes]

    def pressure(self, now: float) -> float:
        readings, routed = self._readings(now)
        return pool_pressure(readings, self.aggregate, routed=routed)

    def scraped_at(self, now: float) -> float:
        """When the oldest scrape behind `pressure` was taken: what was dispatched since
        is not in it. `now` when no fresh scrape counts (a stale backend already reads as
        saturated, so nothing needs crediting)."""
        readings, routed = self._readings(now)
        ages = [
            r.age_s
            for r, in_rotation in zip(readings, routed, strict=True)
            if in_rotation and r.known and not r.stale
        ]
        return now - max(ages, default=0.0)

    def statistics(self, now: float | None = None) -> PoolPressureStatistics:
        """A snapshot per backend; `now` defaults to trio's clock."""
        now = trio.current_time() if now is None else now
        readings, routed = self._readings(now)
        names = [probe.name for probe in self.probes]
        return PoolPressureStatistics(
            pool_pressure(readings, self.aggregate, routed=routed),
            self.aggregate,
            dict(zip(names, readings, strict=True)),
            frozenset(n for n, in_rotation in zip(names, routed, strict=True) if not in_rotation),
        )

    async def run(self) -> None:
        """Run every probe's loop until cancelled (start it in the service nursery)."""
        async with trio.open_nursery() as nursery:
            for probe in self.probes:
                nursery.start_soon(probe.run)
