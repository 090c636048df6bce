"""A real Prometheus server scrapes the gateway's metrics and answers PromQL over them.

Prometheus first sees the `EXPECTED` requests per tier counted; then, with the gateway under
a little load, every query of every panel of `dashboards/grafana.json` (Grafana's variables
replaced by concrete values) must return at least one series with a finite value: a panel
that stays empty on a live gateway is a broken panel (a metric never exported, a label that
does not exist, a rate over a series that never moves, a quantile of nothing).
Needs Debian's `prometheus` package (`apt-get install prometheus`); skipped without it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from backends.redis.embedded import free_port
from tests.conftest import gateway_settings, start_demo, start_gateway
from tests.service.test_cli import wait_ready
from tests.service.test_metrics import dashboard_exprs

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the prometheus binary is not installed (apt-get install prometheus)",
)

SCHEDULER = str(Path(sys.executable).parent / "scheduler")
EXPECTED = {"enterprise": 7, "free": 3}
DEADLINE_S = 30.0
SCRAPE_S = 1.0  # Prometheus's scrape interval in `running_prometheus`
LOAD_ROUNDS = 20  # at most, one scrape apart
LOAD_PER_ROUND = {"enterprise": 2, "pro": 1}  # within their quotas (free: 10 a minute)
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


async def send_chats(client: httpx2.AsyncClient, gateway: str, counts: dict[str, int]) -> None:
    """`counts[tier]` small chat completions with that tier's demo key, each a 200."""
    chat = {"model": "demo-small", "messages": [{"role": "user", "content": "hi"}]}
    for tier, count in counts.items():
        for _ in range(count):
            response = await client.post(
                gateway + "/v1/chat/completions",
                json={**chat, "max_tokens": 4},
                headers={"authorization": f"Bearer sk-demo-{tier}"},
            )
            assert response.status_code == 200, response.text


def workers_config(prefix: str) -> str:
    """The default tiers, the demo keys by name and Redis keys of this test's own."""
    keys = "".join(
        f'[[keys]]\nkey = "sk-demo-{tier}"\ntenant = "demo-{tier}"\ntier = "{tier}"\n'
        for tier in ("free", "pro", "enterprise")
    )
    return f'[redis]\nprefix = "{prefix}"\n{keys}'


@contextmanager
def serving_workers(tmp_path: Path, redis_url: str, workers: int) -> Iterator[str]:
    """`scheduler serve --workers N` (the demo backend its child): every scrape merges the
    workers' metric files, which is what the dashboard sees in a real deployment."""
    config = tmp_path / "workers.toml"
    config.write_text(workers_config(f"test-{uuid.uuid4().hex[:12]}"))
    port = free_port()
    command = [SCHEDULER, "serve", "--config", str(config), "--port", str(port)]
    command += ["--redis-url", redis_url, "--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCHEDULER_", "OTEL_"))}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=10)


@pytest.fixture(params=[1, 2], ids=["in-process", "2-workers"])
async def gateway(
    request: pytest.FixtureRequest, nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> AsyncIterator[str]:
    """The gateway (with Redis, as deployed: its panels show Redis up), sent `EXPECTED`:
    one replica in this process, or `scheduler serve` with two workers."""
    with ExitStack() as stack:
        if request.param == 1:
            settings = gateway_settings(await start_demo(nursery), redis_url)
            url = await start_gateway(nursery, settings)
        else:
            url = await trio.to_thread.run_sync(
                stack.enter_context, serving_workers(tmp_path, redis_url, request.param)
            )
        with trio.fail_after(DEADLINE_S):
            async with httpx2.AsyncClient(timeout=10) as client:
                await send_chats(client, url, EXPECTED)
        yield url


@asynccontextmanager
async def running_prometheus(tmp_path: Path, scrape_url: str) -> AsyncIterator[str]:
    """Our own Prometheus on a free loopback port, scraping `scrape_url` every second."""
    target = httpx2.URL(scrape_url)
    config = {  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "scheduler",
                "metrics_path": target.path,
                "static_configs": [{"targets": [f"{target.host}:{target.port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))
    address = f"127.0.0.1:{free_port()}"
    log = (tmp_path / "prometheus.log").open("wb")
    process = await trio.lowlevel.open_process(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={address}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://{address}"
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        log.close()


async def query(client: httpx2.AsyncClient, base: str, promql: str) -> dict[str, Any]:
    response = await client.get(base + "/api/v1/query", params={"query": promql})
    answer: dict[str, Any] = response.json()
    return answer


async def wait_for_counts(client: httpx2.AsyncClient, base: str, log: Path) -> None:
    """Poll until `sum by (tier)` equals `EXPECTED`, failing with what was seen instead."""
    seen: object = None
    with trio.move_on_after(DEADLINE_S):
        while True:
            try:
                answer = await query(client, base, "sum by (tier) (scheduler_requests_total)")
                result = answer["data"]["result"]
                seen = {r["metric"]["tier"]: float(r["value"][1]) for r in result}
                if seen == EXPECTED:
                    return
            except (httpx2.TransportError, ValueError, KeyError) as exc:
                seen = repr(exc)
            await trio.sleep(0.25)
    targets = "(no answer)"
    with suppress(httpx2.TransportError):
        targets = (await client.get(base + "/api/v1/targets")).text
    pytest.fail(
        f"Prometheus did not see {EXPECTED} within {DEADLINE_S} s; last: {seen}\n"
        f"targets: {targets}\nlog: {log.read_text()[-2000:]}"
    )


def with_variables(expr: str) -> str:
    for name, replacement in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, replacement)
    expr = re.sub(r"\$\{?tier\}?", ".*", expr)
    assert "$" not in expr, f"unknown dashboard variable in {expr}"
    return expr


def finite_series(answer: dict[str, Any]) -> int:
    """How many series of an instant query's answer have a finite value (what a panel draws)."""
    if answer.get("status") != "success" or answer["data"]["resultType"] != "vector":
        return 0
    return sum(1 for r in answer["data"]["result"] if math.isfinite(float(r["value"][1])))


async def empty_panels(client: httpx2.AsyncClient, base: str) -> dict[str, dict[str, Any]]:
    """Every dashboard query that draws nothing right now, with Prometheus's answer."""
    empty: dict[str, dict[str, Any]] = {}
    for expr in dashboard_exprs():
        answer = await query(client, base, with_variables(expr))
        assert answer["status"] == "success", (expr, answer)
        if not finite_series(answer):
            empty[expr] = answer
    return empty


async def test_prometheus_scrapes_tier_counts_and_runs_the_dashboard(
    tmp_path: Path, gateway: str
) -> None:
    with trio.fail_after(DEADLINE_S + 30):
        async with (
            running_prometheus(tmp_path, gateway + "/metrics") as base,
            httpx2.AsyncClient(timeout=5) as client,
        ):
            await wait_for_counts(client, base, tmp_path / "prometheus.log")
            answer = await query(client, base, "max(scheduler_tier_slo_seconds)")
            assert math.isclose(float(answer["data"]["result"][0]["value"][1]), 30.0)
            # a little load while Prometheus scrapes, so rates and quantiles have samples
            empty: dict[str, dict[str, Any]] = {}
            with trio.move_on_after(DEADLINE_S):
                for _ in range(LOAD_ROUNDS):
                    await send_chats(client, gateway, LOAD_PER_ROUND)
                    empty = await empty_panels(client, base)
                    if not empty:
                        break
                    await trio.sleep(SCRAPE_S)
            assert not empty, f"panels that draw nothing under load: {empty}"
