"""The simulator decides nothing its own way: its quota decisions, pool pressure, fallback
headroom and fair-queue cost held to the service's own (the whole schedule, decision by
decision, is tests/sim/test_replay.py).

The service side is built the way the gateway builds it: the scenario's gateway config
(`bench.fidelity_schedule.gateway_config`, the live rig's) loaded by the service's own
`load_settings`, its quota settings taken on the Redis store on a real redis-server at the
arrivals' times, the request's cost from the service's `InferenceCall`. The simulator side
is its engine run on the same scenario. Every key's quota state must come out the same, and
so must the tier's counts; then the pool's pressure, the fallback headroom and the fair
queue's cost are held to the service's own functions.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from backends.probes.metrics import ModelProbe, PoolPressure
from backends.redis.quota import RedisQuotaStore
from bench.fidelity_schedule import MODEL, arrival_schedule, clear_key, gateway_config
from scheduler.core import request_cost
from scheduler.core.quota_store import QuotaLayer, Slot
from scheduler.models.gpu import GpuConfig
from scheduler.openai.body import InferenceCall
from scheduler.service.config import key_id, load_settings
from sim.engine import Simulation
from sim.engine.model import (
    QuotaAlgorithm,
    QuotaUnit,
    Scenario,
)
from sim.engine.model import QuotaSpec as SimQuota
from sim.engine.state import Backend, probe_config, scrape
from sim.scenario import parse_scenario
from tests.conftest import open_pipelined

SCENARIO = """
name = "shared_decisions"
duration_s = 12
seed = 11

[backends]
count = 16
max_batch = 32

[controller]
kind = "fixed"
fixed_limit = 512

[[tiers]]
name = "free"
weight = 1
max_wait_s = 5
slo_latency_s = 30
rate_rps = 30
keys = 4
key_skew = 1.0
prompt_tokens = { dist = "uniform", min = 5, max = 60 }
output_tokens = { dist = "uniform", min = 1, max = 40 }
"""


def scenario(algorithm: QuotaAlgorithm, unit: QuotaUnit) -> Scenario:
    base = parse_scenario(SCENARIO, source="shared_decisions.toml")
    limit = 6 if unit is QuotaUnit.REQUESTS else 400
    quota = SimQuota(limit, 1.0, limit + 2, algorithm, unit)
    return replace(base, tiers=(replace(base.tiers[0], quota=quota),))


@pytest.mark.parametrize("unit", list(QuotaUnit))
@pytest.mark.parametrize("algorithm", list(QuotaAlgorithm))
async def test_every_quota_decision_is_the_services(
    algorithm: QuotaAlgorithm, unit: QuotaUnit, redis_url: str, tmp_path: Path
) -> None:
    sc = scenario(algorithm, unit)
    schedule = arrival_schedule(sc)
    config = tmp_path / "gateway.toml"
    config.write_text(gateway_config(sc, ["http://127.0.0.1:1"], schedule))
    requests, tokens = load_settings(config, env={}).tier("free").quotas.specs()

    refused = 0
    async with open_pipelined(redis_url) as (redis, pipeliner):
        store = RedisQuotaStore(
            redis, prefix=f"shared-{uuid.uuid4().hex[:8]}", pipeliner=pipeliner, min_ttl_s=600
        )
        for a in schedule:
            call = InferenceCall("chat", "m", False, a.prompt_tokens, a.output_tokens, {})
            decision = await store.take(
                a.key, requests=requests, tokens=tokens, token_cost=int(call.cost), now=a.at_s
            )
            refused += not decision.allowed
        simulation = Simulation(sc)
        result = simulation.run().tier("free")
        assert 0 < refused < len(schedule) // 2  # the quota bites, and not on everything
        assert (result.offered, result.refused_by_quota) == (len(schedule), refused)
        assert result.shed == result.dropped == 0  # nothing else decided here

        ts = simulation.tiers[0]
        assert ts.quotas is not None
        slot: Slot = "requests" if unit is QuotaUnit.REQUESTS else "tokens"
        spec = requests if unit is QuotaUnit.REQUESTS else tokens
        assert spec is not None and spec in (ts.quota_requests, ts.quota_tokens)
        limiter = ts.quotas.limiter(slot, spec)
        # every key's state says the same at the end (the memory store has already forgotten
        # the states that ran out; Redis keeps them 10 min: either way they peek alike)
        peek, end = spec.rate_algorithm(), schedule[-1].at_s
        for key in {a.key for a in schedule}:
            redis_state = await store.state(key, slot=slot, spec=spec)
            mine = peek.take(limiter.state(key), now=end, cost=0)[0]
            assert mine == peek.take(redis_state, now=end, cost=0)[0], key


LAYERED = (
    SCENARIO.replace("keys = 4", "keys = 6\ntenants = 2")
    + """
[tiers.quota]
limit = 6
period_s = 1.0
[tiers.tenant_quota]
limit = 16
period_s = 1.0

[model_quota]
limit = 800
period_s = 1.0
unit = "tokens"
algorithm = "gcra"
"""
)


async def test_every_layered_quota_decision_is_the_services(redis_url: str, tmp_path: Path) -> None:
    """A key's own quota, its tenant's and the model's: the simulator's memory store and the
    service's Redis script, on the gateway's own config of the scenario, refuse the same
    arrivals and leave the shared layers in the same state."""
    sc = parse_scenario(LAYERED, source="layered.toml")
    schedule = arrival_schedule(sc)
    config = tmp_path / "gateway.toml"
    config.write_text(gateway_config(sc, ["http://127.0.0.1:1"], schedule))
    settings = load_settings(config, env={})
    requests, tokens = settings.tier("free").quotas.specs()
    shared, tenant_of = settings.shared_quotas, {k.key_id: k.tenant for k in settings.keys}

    refused, by_layer = 0, dict.fromkeys(("key", "tenant", "model"), 0)
    async with open_pipelined(redis_url) as (redis, pipeliner):
        store = RedisQuotaStore(
            redis, prefix=f"shared-{uuid.uuid4().hex[:8]}", pipeliner=pipeliner, min_ttl_s=600
        )
        for a in schedule:
            tenant = tenant_of[key_id(clear_key(a), settings.key_secret)]
            call = InferenceCall("chat", "m", False, a.prompt_tokens, a.output_tokens, {})
            decision = await store.take(
                a.key,
                requests=requests,
                tokens=tokens,
                token_cost=int(call.cost),
                now=a.at_s,
                layers=shared.layers(tenant, MODEL),
                tag=shared.tag(tenant),
            )
            refused += not decision.allowed
            if not decision.allowed:
                for d in decision.layers:
                    by_layer[d.layer.name] += not d.fits
                by_layer["key"] += bool(decision.requests and not decision.requests.allowed)
        simulation = Simulation(sc)
        result = simulation.run().tier("free")
        assert all(by_layer[name] > 0 for name in ("key", "tenant", "model")), by_layer
        assert (result.offered, result.refused_by_quota) == (len(schedule), refused)

        ts = simulation.tiers[0]
        assert ts.quotas is not None and ts.model is not None
        model = QuotaLayer("model", MODEL, ts.model.requests, ts.model.tokens)
        assert model.tokens is not None and shared.layers("x", MODEL)[-1].tokens == model.tokens
        mine = ts.quotas.limiter("tokens", model.tokens, "model").state("sim")
        theirs = await store.state("", slot="tokens", spec=model.tokens, layer=model, tag="quota")
        assert mine == theirs


def test_the_sims_pressure_is_the_pools() -> None:
    """The service's `PoolPressure` over probes holding the sim's backend models reads what
    the sim's controller is told: a lost backend goes stale, and as the pool ejects it (the
    sim routes nothing to it), it is left out of the mean rather than read as saturated."""
    gpu = GpuConfig(max_batch=4)
    probe = probe_config(gpu, 0.5)
    backends = [Backend(i, gpu, 0.0, probe) for i in range(4)]
    probes = []
    for b in backends:
        service_probe = ModelProbe(f"b{b.index}", probe, 0.5)
        service_probe.model = b.pressure
        probes.append(service_probe)
    pool = PoolPressure(probes, in_rotation=lambda name: backends[int(name[1:])].alive)
    for seq in range(6):
        backends[0].gpu.submit(seq, 10, 10, now=0.0)
    busy = scrape(backends, 0.0)
    assert 0 < busy < 1 and busy == pool.pressure(0.0)
    backends[3].alive = False  # its probe fails from now on
    fresh = scrape(backends, 1.0)
    later = scrape(backends, 3.5)  # 2.5 s after its last scrape: past stale_after_s (2 s)
    stats = pool.statistics(3.5)
    assert stats.backends["b3"].stale and stats.out_of_rotation == {"b3"}
    assert later == pool.pressure(3.5) == stats.pressure
    assert later < (3 * fresh + 1.0) / 4  # not the stale one counted as saturated


def test_the_fair_queue_cost_is_the_services() -> None:
    """The sim submits `request_cost(prompt, output)`; the gateway's `InferenceCall.cost`
    with `max_tokens` = the output is the same number, and so is the token reservation."""
    for a in arrival_schedule(scenario(QuotaAlgorithm.GCRA, QuotaUnit.TOKENS)):
        call = InferenceCall("chat", "m", False, a.prompt_tokens, a.output_tokens, {})
        assert call.cost == request_cost(a.prompt_tokens, a.output_tokens)


OVERLOADED = """
name = "shed_gives_back"
duration_s = 20
seed = 3

[backends]
count = 1
max_batch = 1

[controller]
kind = "fixed"
fixed_limit = 1

[[tiers]]
name = "free"
weight = 1
max_wait_s = 0.05
max_depth = 1
slo_latency_s = 30
rate_rps = 20
keys = 1
output_tokens = 200

[tiers.quota]
limit = 5
period_s = 1
"""


def test_a_request_shed_to_a_503_gives_its_quota_back() -> None:
    """The gateway settles a 503 as `failed`: the request is not counted in the key's quota.
    Here one slot serves well under 5 requests a second of the 20 offered, and every other
    request is shed, so the key never reaches its quota of 5 a second (the sim charged every
    shed request before, and refused about three quarters of the arrivals)."""
    result = Simulation(parse_scenario(OVERLOADED, source="shed.toml")).run().tier("free")
    assert result.shed > result.offered // 2
    assert result.refused_by_quota == 0
