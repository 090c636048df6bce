"""The fidelity rig's live run: the gateway in this trio process, in front of demo servers
(one per backend of the scenario) or of running engines (`backend_urls`), and the schedule
replayed against it in real time, open-model (each request goes out at its time whatever the
earlier ones are doing), with the controller's limit watched at the simulator's sample times.
"""

from __future__ import annotations

import dataclasses
import secrets
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import trio

from backends.demo.server import DemoConfig, serve_demo_backend
from bench.fidelity_schedule import (
    MODEL,
    Arrival,
    check_live,
    clear_key,
    gateway_config,
)
from scheduler.models.exposition import parse_scrape
from scheduler.models.pressure import Scrape
from scheduler.openai.body import prompt_text
from scheduler.service.config import load_settings
from scheduler.service.serve import serve_replica
from sim.engine.model import ControllerKind, Scenario

ADMIN_TOKEN = "fidelity-admin"
SHED_HEADER = "x-scheduler-shed"
_START_DELAY_S = 0.5  # between the gateway's readiness and the schedule's time 0
_CLIENT_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class LiveOutcome:
    """What the client saw of one request."""

    status: int  # 0: no response (a client-side error)
    shed: bool  # the gateway shed it (its 503 names a reason)
    latency_s: float  # send to the end of the response
    lag_s: float  # how late it was sent against the schedule


@dataclass(frozen=True, slots=True)
class ControllerSample:
    """The gateway's controller at one of the simulator's sample times, and what the engines
    themselves reported then (their `/metrics`; None against demo servers)."""

    t_s: float
    limit: float
    pressure: float
    inflight: int
    engine_running: float | None = None  # summed over the engines
    engine_waiting: float | None = None


@dataclass(frozen=True, slots=True)
class LiveRun:
    outcomes: tuple[LiveOutcome, ...]  # one per arrival, in schedule order
    controller: tuple[ControllerSample, ...]  # every sample_s
    config: str  # the gateway's TOML

    @property
    def limits(self) -> tuple[tuple[float, float], ...]:
        """(t_s, the controller's limit) at each sample."""
        return tuple((c.t_s, c.limit) for c in self.controller)


async def run_live(
    scenario: Scenario,
    schedule: Sequence[Arrival],
    *,
    redis_url: str | None = None,
    backend_urls: Sequence[str] = (),
) -> LiveRun:
    """Start the gateway in this trio process on loopback, in front of `backend_urls` (running
    engines) or else of a demo server per backend of the scenario, replay `schedule` in real
    time, and stop what it started."""
    check_live(scenario, redis_url=redis_url)
    demo = DemoConfig(gpu=scenario.backends.gpu, model_names=(MODEL,))
    async with trio.open_nursery() as servers:
        urls = list(backend_urls)
        for _ in range(0 if urls else scenario.backends.count):
            port = await servers.start(serve_demo_backend, demo)
            urls.append(f"http://127.0.0.1:{port}")
        config = gateway_config(scenario, urls, schedule)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "gateway.toml"
            path.write_text(config, encoding="utf-8")
            env = {"SCHEDULER_ADMIN_TOKEN": ADMIN_TOKEN}
            settings = load_settings(path, env=env, overrides={"port": 0})
        # Redis keys of its own: a deployment's live gains or spent quotas on the same Redis
        # would otherwise be this run's (the replica follows the gains document it finds)
        prefix = f"fidelity-{uuid.uuid4().hex[:12]}"
        settings = dataclasses.replace(
            settings, redis_url=redis_url, redis_prefix=prefix, source=None
        )
        port = await servers.start(serve_replica, settings)
        gateway = f"http://127.0.0.1:{port}"
        outcomes, samples = await _replay(gateway, scenario, schedule, backend_urls)
        servers.cancel_scope.cancel()
    return LiveRun(outcomes, samples, config)


async def _replay(
    gateway: str, scenario: Scenario, schedule: Sequence[Arrival], engines: Sequence[str]
) -> tuple[tuple[LiveOutcome, ...], tuple[ControllerSample, ...]]:
    outcomes: list[LiveOutcome | None] = [None] * len(schedule)
    samples: list[ControllerSample] = []
    pool = httpx2.Limits(max_connections=4096, max_keepalive_connections=4096)
    async with httpx2.AsyncClient(timeout=_CLIENT_TIMEOUT_S, limits=pool) as client:
        await _wait_settled(client, gateway, scenario)
        start = trio.current_time() + _START_DELAY_S
        run_id = secrets.randbits(40) << 20  # a real engine caches prompts it has seen

        async def one(i: int, arrival: Arrival) -> None:
            body = {
                "model": MODEL,
                "prompt": prompt_text(run_id + i, arrival.prompt_tokens),
                "max_tokens": arrival.output_tokens,
                "ignore_eos": True,  # a real engine's random model stops early otherwise
            }
            headers = {"authorization": f"Bearer {clear_key(arrival)}"}
            sent = trio.current_time()
            try:
                r = await client.post(gateway + "/v1/completions", json=body, headers=headers)
                status, shed = r.status_code, SHED_HEADER in r.headers
            except httpx2.HTTPError:
                status, shed = 0, False
            done = trio.current_time()
            outcomes[i] = LiveOutcome(status, shed, done - sent, sent - start - arrival.at_s)

        async with trio.open_nursery() as load:
            watch = partial(_watch_controller, client, gateway, engines, start, scenario)
            load.start_soon(watch, samples)
            for i, arrival in enumerate(schedule):
                await trio.sleep_until(start + arrival.at_s)
                load.start_soon(one, i, arrival)
    assert all(o is not None for o in outcomes)
    return tuple(o for o in outcomes if o is not None), tuple(samples)


async def _controller(client: httpx2.AsyncClient, gateway: str) -> dict[str, Any]:
    r = await client.get(
        gateway + "/admin/v1/controller", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    r.raise_for_status()
    state: dict[str, Any] = r.json()
    return state


async def _wait_settled(client: httpx2.AsyncClient, gateway: str, scenario: Scenario) -> None:
    """Let the controller tick a few times idle, then check that it still holds its initial
    limit (a tick before the probe's first scrape would see stale pressure and cut it)."""
    spec = scenario.controller
    initial = spec.fixed_limit if spec.kind is ControllerKind.FIXED else spec.aimd.initial_limit
    await trio.sleep(3 * spec.tick_s)
    state = await _controller(client, gateway)
    if state["limit"] != initial or state["pressure"] >= 1.0:
        raise RuntimeError(f"the gateway's controller is not at its initial state: {state}")


async def _watch_controller(
    client: httpx2.AsyncClient,
    gateway: str,
    engines: Sequence[str],
    start: float,
    scenario: Scenario,
    into: list[ControllerSample],
) -> None:
    """The controller's state at the simulator's sample times over the schedule, and the
    engines' own running and waiting counts read at the same moments."""
    k = 1
    while k * scenario.sample_s <= scenario.duration_s:
        await trio.sleep_until(start + k * scenario.sample_s)
        t_s = trio.current_time() - start
        state = await _controller(client, gateway)
        running = waiting = None
        if engines:
            scrapes = [await _engine_scrape(client, url) for url in engines]
            running = sum(s.running or 0.0 for s in scrapes)
            waiting = sum(s.waiting or 0.0 for s in scrapes)
        into.append(
            ControllerSample(
                t_s,
                float(state["limit"]),
                float(state["pressure"]),
                int(state["inflight"]),
                running,
                waiting,
            )
        )
        k += 1


async def _engine_scrape(client: httpx2.AsyncClient, url: str) -> Scrape:
    r = await client.get(url + "/metrics")
    r.raise_for_status()
    return parse_scrape(r.text, at=trio.current_time())
