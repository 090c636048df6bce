"""`scheduler calibrate`: profile an OpenAI-compatible backend black-box and fit the simulator.

Why bursts: a point is `concurrency` streamed `/v1/completions` requests sent at once, each
with the same prompt and `max_tokens`, repeated `--rounds` times; the client times each
request's first token and its last, so the time per output token is (last - first) / (n - 1).
The same burst runs through the model in `sim.calibration`, so the fit compares like with like.
Concurrency doubles from 1 for each prompt length, and stops two levels after throughput stops
growing (or at `--max-concurrency`); the whole run stops at `--max-requests` or `--time-limit`.
Then a join per prompt length: a batch one short of full decoding, and one more request sent
once all have their first token, timed to its own first token (what a prompt costs the
batch it joins, which a burst into an idle engine never shows; `rounds` times each).

Prompts are `scheduler.openai.body.prompt_text`: 4 P - 1 characters, which the gateway
estimates as P tokens, each starting with an id of its own (engines cache prompts, by
prefix); the engine's own count (its usage) is what the fit uses when it reports one. While a
burst runs, `/metrics` is read every METRICS_POLL_S for the engine's count of running
requests: the largest seen in a burst that asked for more is the batch size (`--parallel`,
`--max-num-seqs`), else the throughput's knee is. KV
capacity comes from the engine's `/metrics` when they tell it (SGLang's
`max_total_num_tokens`, vLLM's `cache_config_info`, llama.cpp's `kv_cache_tokens` over its
usage ratio); else the model's default stays, which only matters if prompts are long.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import trio

from backends.http.client import bearer
from scheduler.openai.body import prompt_text
from sim.calibration import (
    ERROR_COLUMNS,
    SATURATION_GAIN,
    Fit,
    JoinPoint,
    Point,
    backends_section,
    error_table,
    fit,
    kv_capacity_from_metrics,
    running_from_metrics,
    saturation_concurrency,
)
from sim.report import format_table

Log = Callable[[str], None]
METRICS_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Bounds:
    prompts: tuple[int, ...] = (32, 256)
    output_tokens: int = 32
    max_concurrency: int = 16
    rounds: int = 3
    max_requests: int = 400
    time_limit_s: float = 120.0
    request_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Sample:
    prompt_tokens: int  # as the engine counted them, else the requested size
    output_tokens: int
    ttft_s: float
    total_s: float


class Profiler:
    """Runs the bursts against `url` for `model`, within `bounds`, reporting to `log`."""

    def __init__(self, client: httpx2.AsyncClient, url: str, model: str, bounds: Bounds) -> None:
        self.client = client
        self.url = url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.bounds = bounds
        self.requests = 0
        # ids of this run alone: llama.cpp keeps earlier prompts in a host cache, and a prompt
        # seen before would skip its prefill
        self._next_id = secrets.randbits(40) << 20
        self._deadline_at = time.monotonic() + bounds.time_limit_s
        self.max_batch: int | None = None  # the most running at once, in a burst of more
        self._has_metrics = True

    def _budget_for(self, concurrency: int) -> bool:
        need = concurrency * self.bounds.rounds
        return self.requests + need <= self.bounds.max_requests and (
            time.monotonic() < self._deadline_at
        )

    async def one(
        self, prompt_tokens: int, output_tokens: int = 0, first: trio.Event | None = None
    ) -> Sample:
        """One streamed request (`output_tokens`, else the bounds'), `first` set at its first
        token."""
        self._next_id += 1
        self.requests += 1
        body = {
            "model": self.model,
            "prompt": prompt_text(self._next_id, prompt_tokens),
            "max_tokens": output_tokens or self.bounds.output_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,  # vLLM and llama.cpp honour it; others ignore the field
            "temperature": 0,
        }
        sent = time.monotonic()
        first_at = math.nan
        tokens = 0
        usage: dict[str, int] = {}
        async with self.client.stream("POST", self.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                raise RuntimeError(f"the backend answered {r.status_code}: {r.text[:300]}")
            async for line in r.aiter_lines():
                chunk = _event(line)
                if chunk is None:
                    continue
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if any(c.get("text") for c in chunk.get("choices") or ()):
                    tokens += 1
                    if math.isnan(first_at):
                        first_at = time.monotonic()
                        if first is not None:
                            first.set()
        done = time.monotonic()
        return Sample(
            int(usage.get("prompt_tokens") or prompt_tokens),
            int(usage.get("completion_tokens") or tokens),
            first_at - sent,
            done - sent,
        )

    async def burst(self, concurrency: int, prompt_tokens: int) -> Point:
        samples: list[Sample] = []
        started = time.monotonic()

        async def run() -> None:
            samples.append(await self.one(prompt_tokens))

        async with trio.open_nursery() as watching:
            running = await watching.start(self._watch_running)
            for _ in range(self.bounds.rounds):
                async with trio.open_nursery() as nursery:
                    for _ in range(concurrency):
                        nursery.start_soon(run)
            watching.cancel_scope.cancel()
        wall_s = time.monotonic() - started
        if running and max(running) < concurrency:  # the engine ran fewer than were sent
            self.max_batch = max(self.max_batch or 0, max(running))
        return _point(concurrency, samples, wall_s)

    async def join(self, decoding: int, prompt_tokens: int) -> JoinPoint:
        """`rounds` times: `decoding` requests of this prompt length and three times the
        output, and once all have their first token, one more of the same prompt length,
        timed to its first token."""
        long_output = 3 * self.bounds.output_tokens
        running: list[Sample] = []
        joins: list[Sample] = []
        for _ in range(self.bounds.rounds):
            async with trio.open_nursery() as nursery:
                firsts = [trio.Event() for _ in range(decoding)]
                for event in firsts:
                    nursery.start_soon(self._into, running, prompt_tokens, long_output, event)
                for event in firsts:
                    await event.wait()
                joins.append(await self.one(prompt_tokens, 2))
        return JoinPoint(
            decoding=decoding,
            prompt_tokens=round(statistics.median(s.prompt_tokens for s in joins)),
            running_prompt_tokens=round(statistics.median(s.prompt_tokens for s in running)),
            running_output_tokens=round(statistics.median(s.output_tokens for s in running)),
            ttft_s=statistics.median(s.ttft_s for s in joins),
        )

    async def _into(
        self, samples: list[Sample], prompt_tokens: int, output_tokens: int, first: trio.Event
    ) -> None:
        samples.append(await self.one(prompt_tokens, output_tokens, first))

    async def _watch_running(self, *, task_status: trio.TaskStatus[list[int]]) -> None:
        """The engine's running count every METRICS_POLL_S, into the list it reports started
        (left empty when the engine has no such metric)."""
        seen: list[int] = []
        task_status.started(seen)
        while self._has_metrics:
            try:
                r = await self.client.get(self.url + "/metrics")
            except httpx2.HTTPError:
                r = None
            running = (
                running_from_metrics(r.text) if r is not None and r.status_code == 200 else None
            )
            if running is None:
                self._has_metrics = r is None  # an answer without the metric: none to wait for
            else:
                seen.append(running)
            await trio.sleep(METRICS_POLL_S)

    async def profile(self, log: Log) -> list[Point]:
        await self.one(self.bounds.prompts[0])  # warm-up: the first request pays setup
        points: list[Point] = []
        for prompt in self.bounds.prompts:
            concurrency, best_tps, flat = 1, 0.0, 0
            while concurrency <= self.bounds.max_concurrency and self._budget_for(concurrency):
                point = await self.burst(concurrency, prompt)
                points.append(point)
                log(_progress(point, self.requests, self._deadline_at))
                flat = flat + 1 if point.throughput_tps < best_tps * (1 + SATURATION_GAIN) else 0
                if flat == 2:
                    break  # two levels past saturation show the queueing
                best_tps = max(best_tps, point.throughput_tps)
                concurrency *= 2
        return points

    async def profile_joins(self, points: Sequence[Point], log: Log) -> list[JoinPoint]:
        """A join per prompt length into a batch one short of full (the batch from the
        metrics, else the throughput's knee), within the budget."""
        decoding = (self.max_batch or saturation_concurrency(points)) - 1
        joins: list[JoinPoint] = []
        for prompt in self.bounds.prompts if decoding > 0 else ():
            if not self._budget_for(decoding + 1):
                break
            join = await self.join(decoding, prompt)
            joins.append(join)
            log(
                f"calibrate: {decoding} decoding, a {join.prompt_tokens}-token prompt joins: "
                f"ttft {1000 * join.ttft_s:7.1f} ms ({self.requests} requests)"
            )
        return joins

    async def kv_capacity_tokens(self) -> int | None:
        try:
            r = await self.client.get(self.url + "/metrics")
        except httpx2.HTTPError:
            return None
        return kv_capacity_from_metrics(r.text) if r.status_code == 200 else None


def _event(line: str) -> dict[str, Any] | None:
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    value = json.loads(data)
    return value if isinstance(value, dict) else None


def _point(concurrency: int, samples: Sequence[Sample], wall_s: float) -> Point:
    """Medians, so that one stalled request (a busy machine) does not make the point."""
    tpots = [(s.total_s - s.ttft_s) / (s.output_tokens - 1) for s in samples if s.output_tokens > 1]
    return Point(
        concurrency=concurrency,
        prompt_tokens=round(statistics.median(s.prompt_tokens for s in samples)),
        output_tokens=round(statistics.median(s.output_tokens for s in samples)),
        ttft_s=statistics.median(s.ttft_s for s in samples),
        tpot_s=statistics.median(tpots) if tpots else math.nan,
        throughput_tps=sum(s.output_tokens for s in samples) / wall_s,
    )


def _progress(point: Point, requests: int, deadline_at: float) -> str:
    left = max(0.0, deadline_at - time.monotonic())
    return (
        f"calibrate: concurrency {point.concurrency:3d}, prompt {point.prompt_tokens:5d} tok: "
        f"ttft {1000 * point.ttft_s:7.1f} ms, tpot {1000 * point.tpot_s:6.2f} ms, "
        f"{point.throughput_tps:6.0f} tok/s ({requests} requests, {left:.0f} s left)"
    )


async def calibrate(url: str, model: str, bounds: Bounds, log: Log, *, api_key: str = "") -> Fit:
    """Profile the backend at `url` (sending `api_key`, if it wants one) and fit the
    simulator's backend model to it."""
    timeout = httpx2.Timeout(bounds.request_timeout_s)
    # no keep-alive: llama-server closes idle connections at times, racing a reuse
    pool = httpx2.Limits(max_connections=bounds.max_concurrency + 4, max_keepalive_connections=0)
    headers = bearer(api_key)
    async with httpx2.AsyncClient(timeout=timeout, limits=pool, headers=headers) as client:
        profiler = Profiler(client, url, model, bounds)
        points = await profiler.profile(log)
        joins = await profiler.profile_joins(points, log)
        kv = await profiler.kv_capacity_tokens()
    return fit(points, kv_capacity_tokens=kv, max_batch=profiler.max_batch, joins=joins)


def _backend_error(exc: Exception) -> Exception:
    """The first error the backend caused (a burst's nursery groups them); anything else is
    a bug and propagates."""
    while isinstance(exc, ExceptionGroup):
        matched, rest = exc.split((httpx2.HTTPError, RuntimeError, ValueError))
        if rest is not None or matched is None:
            raise exc
        exc = matched.exceptions[0]
    return exc


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Profile an OpenAI-compatible backend and fit the simulator."
    )
    default = Bounds()
    parser.add_argument("--url", required=True, help="the backend's base URL")
    parser.add_argument("--model", required=True, help="the model name to ask for")
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="the environment variable holding the backend's key (its --api-key)",
    )
    parser.add_argument("--out", help="write the scenario's [backends] section here")
    parser.add_argument(
        "--prompts",
        default=",".join(map(str, default.prompts)),
        help="prompt lengths in tokens, comma-separated (default %(default)s)",
    )
    parser.add_argument("--output-tokens", type=int, default=default.output_tokens)
    parser.add_argument("--max-concurrency", type=int, default=default.max_concurrency)
    parser.add_argument("--rounds", type=int, default=default.rounds, help="bursts per point")
    parser.add_argument("--max-requests", type=int, default=default.max_requests)
    parser.add_argument("--time-limit", type=float, default=default.time_limit_s, help="seconds")
    return parser


def main(argv: list[str] | None = None, *, prog: str = "scheduler calibrate") -> int:
    args = build_parser(prog).parse_args(argv)
    bounds = Bounds(
        prompts=tuple(int(p) for p in args.prompts.split(",") if p.strip()),
        output_tokens=max(2, args.output_tokens),
        max_concurrency=max(1, args.max_concurrency),
        rounds=max(1, args.rounds),
        max_requests=args.max_requests,
        time_limit_s=args.time_limit,
    )

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    api_key = os.environ.get(args.api_key_env, "") if args.api_key_env else ""
    if args.api_key_env and not api_key:
        print(f"{prog}: environment variable {args.api_key_env} is not set", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        result = trio.run(partial(calibrate, api_key=api_key), args.url, args.model, bounds, log)
    except (httpx2.HTTPError, RuntimeError, ValueError, ExceptionGroup) as exc:
        print(f"{prog}: {_backend_error(exc)}", file=sys.stderr)
        return 1
    print(format_table(ERROR_COLUMNS, error_table(result)))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"mean error {100 * result.mean_error:.1f}%; throughput stops growing at concurrency "
        f"{result.saturation_concurrency}; batch {result.gpu.max_batch}; "
        f"{time.monotonic() - started:.0f} s, load {load}"
    )
    comment = f"calibrated by `scheduler calibrate` against {args.url} (model {args.model})"
    section = backends_section(result, comment=comment)
    if args.out:
        Path(args.out).write_text(section, encoding="utf-8")
    else:
        print(section, end="")
    return 0
