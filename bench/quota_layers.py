"""The cost of quota layers: one take with the key's own quotas vs with its tenant's and its
model's too (README "Quota layers"), on a real redis-server.

    python -m bench.quota_layers [--takes 3000] [--algorithm sliding_log] [--layers sliding_counter]

The key's own quotas by `--algorithm` (the tiers' default, `sliding_log`), the tenant's and the
model's by `--layers` (the shared quotas' default, `sliding_counter`). Each configuration runs
`--takes` sequential takes (100 keys over 10 tenants, quotas never reached: the admission
path) through the service's store and pipeliner, and reports Redis's own CPU per script
(`INFO commandstats`, evalsha), this process's CPU per take (the store's arguments, the
pipeliner, coredis, the reply's parsing) and the wall time per take.
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

import trio

from backends.redis.embedded import EmbeddedRedis
from backends.redis.quota import RedisQuotaStore
from policies.ratelimit import Quota
from scheduler.core.quota_store import ALGORITHM_KINDS, AlgorithmKind, QuotaLayer, QuotaSpec
from tests.conftest import open_pipelined


def layers_for(layered: bool, tenant: str, spec: QuotaSpec) -> tuple[QuotaLayer, ...]:
    if not layered:
        return ()
    return (QuotaLayer("tenant", tenant, spec, spec), QuotaLayer("model", "m", spec, spec))


async def run(
    url: str, *, layered: bool, takes: int, algorithm: AlgorithmKind, shared: AlgorithmKind
) -> dict[str, Any]:
    spec = QuotaSpec(algorithm, Quota(10**9, 60.0))
    shared_spec = QuotaSpec(shared, Quota(10**9, 60.0))
    async with open_pipelined(url) as (redis, pipeliner):
        store = RedisQuotaStore(redis, prefix=f"bench-{uuid.uuid4().hex[:8]}", pipeliner=pipeliner)
        await store.load_scripts()
        await redis.config_resetstat()
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(takes):
            tenant = f"t{i % 10}"
            await store.take(
                f"k{i % 100}",
                requests=spec,
                tokens=spec,
                token_cost=300,
                layers=layers_for(layered, tenant, shared_spec),
                tag="quota" if layered else None,
            )
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        stats: Any = await redis.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {})
    return {
        "layers": 3 if layered else 1,
        "redis_us_per_script": float(evalsha.get("usec_per_call", 0.0)),
        "client_cpu_us_per_take": cpu / takes * 1e6,
        "wall_us_per_take": wall / takes * 1e6,
    }


async def main(takes: int, algorithm: AlgorithmKind, shared: AlgorithmKind) -> None:
    with EmbeddedRedis() as redis:
        for layered in (False, True, False, True):  # twice each: the second is warm
            result = await run(
                redis.url, layered=layered, takes=takes, algorithm=algorithm, shared=shared
            )
            print(result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--takes", type=int, default=3000)
    parser.add_argument("--algorithm", choices=ALGORITHM_KINDS, default="sliding_log")
    parser.add_argument("--layers", choices=("sliding_counter", "gcra"), default="sliding_counter")
    args = parser.parse_args()
    trio.run(main, args.takes, args.algorithm, args.layers)
