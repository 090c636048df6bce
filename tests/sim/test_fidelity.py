"""Fidelity at a reduced scale: the simulator and the live gateway, on the same arrivals.

The live comparison replays 30 s of a small overloaded scenario (one demo GPU, three tiers,
Free shed by about half) in real time against the gateway, with a fixed limit so that both
sides hold the same admission window. The full comparison, minutes long and with AIMD, is
`bench/fidelity.py` (its report: `bench/FIDELITY.md`).

The bounds are the issue's (10 % on fractions, 15 % on p50) except p95, held to 25 % here:
at this scale a tier's p95 is its 6th or 7th slowest request of ~130, and which requests wait
depends on timing to the millisecond. The simulator alone, with every arrival of this schedule
moved by 0-5 ms (less than the live client's own send lag), moves Enterprise's p95 by up to
16 % (30 draws; p90 9 %); the live run adds ~12 ms per request of HTTP hops and slot
turnaround that the simulator does not model (about 2 % here). Over 150 s (`bench/`) the same
jitter moves no p95 by more than 7 %, and the 15 % bound holds there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import coredis
import pytest
import trio

from backends.demo.openai import Kind, parse_generation
from backends.redis.quota import ALGORITHM_KINDS
from bench.fidelity_llama import at_drift, scenario_text
from bench.fidelity_rig import (
    Fidelity,
    TierOutcome,
    Tolerances,
    compare,
    run_fidelity,
    sim_outcomes,
)
from bench.fidelity_schedule import (
    MODEL,
    Arrival,
    arrival_schedule,
    check_live,
    gateway_config,
)
from policies.ladder import ShedLadder
from scheduler.core import AIMDConfig, GateMode
from scheduler.models.gpu import GpuConfig
from scheduler.openai.body import prompt_text, read_call
from scheduler.service.config import Settings, load_settings
from scheduler.service.gains import publish_gains
from scheduler.service.replica import GAINS_KEY
from sim.calibration import Fit
from sim.engine import simulate
from sim.engine.model import (
    BackendPool,
    ControllerKind,
    ControllerSpec,
    QuotaAlgorithm,
    QuotaSpec,
    Scenario,
)
from sim.engine.results import Percentiles
from sim.scenario import parse_scenario

# About 15 requests/s of capacity (8 at once, ~0.5 s each) against 24 offered: Enterprise
# and Pro fit within it and wait for a free slot at most; Free is shed by about half.
SMALL = """
name = "fidelity_small"
duration_s = 30
seed = 7

[backends]
count = 1
max_batch = 8
max_waiting = 64
decode_base_s = 0.01
decode_per_seq_s = 0.002

[controller]
kind = "fixed"
fixed_limit = 8

[[tiers]]
name = "enterprise"
weight = 8
max_wait_s = 10
slo_latency_s = 5
rate_rps = 4
keys = 4
prompt_tokens = { dist = "lognormal", mean = 200, sigma = 0.5, max = 2000 }
output_tokens = { dist = "uniform", min = 10, max = 30 }

[[tiers]]
name = "pro"
weight = 3
max_wait_s = 3
slo_latency_s = 5
rate_rps = 4
keys = 4
prompt_tokens = { dist = "lognormal", mean = 200, sigma = 0.5, max = 2000 }
output_tokens = { dist = "uniform", min = 10, max = 30 }

[[tiers]]
name = "free"
weight = 1
max_wait_s = 1.5
slo_latency_s = 5
rate_rps = 16
keys = 8
prompt_tokens = { dist = "lognormal", mean = 200, sigma = 0.5, max = 2000 }
output_tokens = { dist = "uniform", min = 10, max = 30 }
"""


def small() -> Scenario:
    return parse_scenario(SMALL, source="fidelity_small.toml")


def test_the_schedule_is_the_simulators_arrivals() -> None:
    scenario = small()
    schedule = arrival_schedule(scenario)
    result = simulate(scenario)
    assert [a.at_s for a in schedule] == sorted(a.at_s for a in schedule)
    assert schedule[0].at_s >= 0 and schedule[-1].at_s < scenario.duration_s
    for tier in result.tiers:
        mine = [a for a in schedule if a.tier == tier.name]
        assert len(mine) == tier.offered
        prompt = sum(a.prompt_tokens for a in mine) / len(mine)
        output = sum(a.output_tokens for a in mine) / len(mine)
        assert prompt == pytest.approx(tier.mean_prompt_tokens)
        assert output == pytest.approx(tier.mean_output_tokens)
        assert {a.key for a in mine} <= {f"{tier.name}-{k}" for k in range(8)}
    assert arrival_schedule(scenario, seed=8) != schedule


def test_a_prompt_counts_as_its_tokens_for_the_gateway_and_the_demo() -> None:
    for tokens in (1, 2, 3, 7, 100, 1234):
        body = {"model": MODEL, "prompt": prompt_text(4321, tokens), "max_tokens": 17}
        call = read_call("completions", json.dumps(body).encode(), default_max_tokens=256)
        assert (call.prompt_tokens, call.cost) == (tokens, tokens + 17)
        demo = parse_generation(body, Kind.COMPLETION, (MODEL,), 64)
        assert (demo.prompt_tokens, demo.output_tokens) == (tokens, 17)
    assert prompt_text(1, 50) != prompt_text(2, 50)


def test_the_gateway_config_follows_the_scenario(tmp_path: Path) -> None:
    scenario = small()
    schedule = arrival_schedule(scenario)
    settings = _settings(tmp_path, scenario, schedule)
    for spec in scenario.tiers:
        tier = settings.tier(spec.name)
        assert (tier.core.weight, tier.core.max_wait_s) == (spec.weight, spec.max_wait_s)
        assert (tier.core.max_depth, tier.core.shed_on_overload) == (spec.max_depth, False)
        assert tier.ladder.steps == () and tier.quotas.unlimited
    assert len(settings.keys) == len({(a.tier, a.key) for a in schedule})
    pinned = settings.controller
    assert pinned.initial_limit == pinned.min_limit == pinned.max_limit == 8
    assert pinned.pressure_threshold == 1.0
    model = settings.models[0]
    assert model.cache_fresh_s == 0 and model.pressure.pressure.waiting_saturation == 8


def test_an_aimd_scenario_with_a_quota_keeps_its_gains_and_quota(tmp_path: Path) -> None:
    gains = AIMDConfig(initial_limit=12, min_limit=2, max_limit=40, target_latency_s=0.8)
    quota = QuotaSpec(5, 1.0, 10, QuotaAlgorithm.SLIDING_COUNTER)
    base = small()
    free = replace(base.tiers[2], quota=quota, shed_on_overload=True)
    scenario = replace(
        base,
        tiers=(*base.tiers[:2], free),
        controller=ControllerSpec(ControllerKind.AIMD, GateMode.RATE, burst_s=0.1, aimd=gains),
    )
    settings = _settings(tmp_path, scenario, arrival_schedule(scenario))
    assert settings.controller == gains
    assert (settings.gate.mode, settings.gate.burst_s) == (GateMode.RATE, 0.1)
    tier = settings.tier("free")
    assert tier.core.shed_on_overload
    assert (tier.quotas.algorithm, tier.quotas.requests, tier.quotas.request_burst) == (
        "sliding_counter",
        5,
        10,
    )


def test_the_simulator_spells_the_algorithms_as_the_service_does() -> None:
    # issue 11: scenarios said `sliding_window_log` where the service's config says `sliding_log`
    assert {a.value for a in QuotaAlgorithm} == set(ALGORITHM_KINDS)


def test_what_a_replay_cannot_reproduce_is_refused() -> None:
    base = small()
    cached = replace(base.tiers[2], cache_hit_ratio=0.2, ladder=ShedLadder.from_names(["cache"]))
    quota = replace(base.tiers[2], quota=QuotaSpec(5, 1.0))
    for scenario, problem in (
        (replace(base, controller=ControllerSpec(ControllerKind.GRADIENT)), "gradient"),
        (replace(base, fallback=BackendPool(1)), "fallback"),
        (replace(base, tiers=(*base.tiers[:2], cached)), "cache_hit_ratio"),
        (replace(base, tiers=(*base.tiers[:2], quota)), "quota without a Redis URL"),
    ):
        with pytest.raises(ValueError, match=problem):
            check_live(scenario, redis_url=None)
    check_live(replace(base, tiers=(*base.tiers[:2], quota)), redis_url="redis://x")


async def test_the_simulator_and_the_gateway_agree(redis_url: str) -> None:
    scenario = small()
    # A deployment on the same Redis has live gains of its own (CI: a limit of 21 against the
    # scenario's 8 doubled every latency): the replayed gateway must follow its scenario only.
    other = AIMDConfig(initial_limit=21, min_limit=21, max_limit=21)
    gains_key = f"sched:{GAINS_KEY}"
    async with coredis.Redis.from_url(redis_url) as redis:
        await publish_gains(redis, gains_key, other, after=0, deadline_at=trio.current_time() + 5)
    try:
        with trio.fail_after(scenario.duration_s + 60):
            fidelity = await run_fidelity(
                scenario, redis_url=redis_url, tolerances=Tolerances(p95=0.25)
            )
    finally:
        async with coredis.Redis.from_url(redis_url) as redis:
            await redis.delete([gains_key])
    report = fidelity.report()
    print(report)  # shown with -s, and by pytest when the test fails
    assert fidelity.live[2].shed > 0.3 * fidelity.live[2].offered, report
    assert fidelity.ok, report


def _settings(tmp_path: Path, scenario: Scenario, schedule: Sequence[Arrival]) -> Settings:
    path = tmp_path / "gateway.toml"
    path.write_text(gateway_config(scenario, ["http://127.0.0.1:1"], schedule))
    return load_settings(path, env={})


def _pro(shed: int, offered: int = 194) -> TierOutcome:
    latency = Percentiles(1.0, 2.0, 3.0)
    return TierOutcome("pro", offered, offered - shed, shed, 0, 0, offered - shed, latency)


def test_one_request_more_or_less_never_decides_a_fraction_check() -> None:
    # 2026-12-04, a quiet llama-server run: 1 of Pro's 194 shed live, none simulated, was
    # 10.3 % against the 5 % floor and failed the run
    shed = {c.metric: c for c in compare([_pro(0)], [_pro(1)], Tolerances())}["shed"]
    assert shed.ok and shed.difference < shed.tolerance
    # two requests are over it
    assert not {c.metric: c for c in compare([_pro(0)], [_pro(2)], Tolerances())}["shed"].ok
    # on a larger tier the 5 % floor is what binds, as before: half a point, 9 of 1,940
    big = {c.metric: c for c in compare([_pro(0, 1940)], [_pro(10, 1940)], Tolerances())}
    assert not big["shed"].ok and big["shed"].difference == pytest.approx(10 / 1940 / 0.05)
    # the same 4 of 213 as on 4 December, with other parameters: still a miss
    four = {c.metric: c for c in compare([_pro(10, 213)], [_pro(6, 213)], Tolerances())}
    assert not four["shed"].ok


def test_the_engines_drift_is_told_apart_from_the_models_miss() -> None:
    """`bench/fidelity_llama.py` re-simulates with the engine as its drift check found it
    after the run: a live run whose engine was 10 % slower than calibrated misses the bar
    against the calibrated simulator and meets it against the drifted one."""
    gpu = GpuConfig(
        max_batch=4,
        decode_base_s=0.0076,
        decode_per_seq_s=0.0011,
        decode_alone_s=0.0036,
        prefill_tokens_per_step=2048,
        prefill_s_per_token=0.000545,
        prefill_join_s=0.0043,
    )
    text = scenario_text(Fit(gpu, (), 4), duration_s=60, load=1.5, controller="fixed")
    scenario = parse_scenario(text)
    live = sim_outcomes(simulate(replace(scenario, backends=BackendPool(1, gpu.scaled(1.1)))))
    run = Fidelity(scenario, sim_outcomes(simulate(scenario)), live, (), (), (), ())
    assert "12 of 12 within the bar" in at_drift(run, 1.1)
    assert "over: " in at_drift(run, 1.0)
