"""A real Prometheus server scrapes the gateway's metrics and answers PromQL over them.

The `scrape_url` fixture gives the `/metrics` URL after `EXPECTED` requests per tier were
counted there. It serves a bare `GatewayMetrics` from a tiny trio HTTP server until the
gateway has its own `/metrics` route; then `real_gateway` takes its place (one word).
Needs Debian's `prometheus` package (`apt-get install prometheus`); skipped without it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from scheduler.service.config import load_settings
from scheduler.service.metrics import GatewayMetrics
from scheduler.service.redis_embedded import free_port
from tests.conftest import gateway_settings, start_demo, start_gateway
from tests.service.test_metrics import dashboard_exprs

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the prometheus binary is not installed (apt-get install prometheus)",
)

EXPECTED = {"enterprise": 7, "free": 3}
DEADLINE_S = 30.0
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


async def fake_gateway(nursery: trio.Nursery) -> str:
    """A trio HTTP server whose `/metrics` is a `GatewayMetrics` fed `EXPECTED`."""
    metrics = GatewayMetrics.from_settings(load_settings(None, env={}))
    for tier, count in EXPECTED.items():
        for _ in range(count):
            metrics.request_done(
                tier=tier,
                route="chat",
                model="demo-small",
                outcome="admitted",
                latency_s=0.2,
                queue_wait_s=0.0,
            )

    async def handle(stream: trio.SocketStream) -> None:
        request = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in request and len(request) < 65536:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                request += chunk
        body, content_type = metrics.render()
        found = request.startswith(b"GET /metrics ")
        head = (
            f"HTTP/1.1 {'200 OK' if found else '404 Not Found'}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body) if found else 0}\r\n"
            "Connection: close\r\n\r\n"
        )
        await stream.send_all(head.encode() + (body if found else b""))
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}/metrics"


async def real_gateway(nursery: trio.Nursery) -> str:
    """The gateway itself (no Redis: quotas are unlimited by default), sent `EXPECTED`."""
    gateway = await start_gateway(nursery, gateway_settings(await start_demo(nursery), ""))
    chat = {"model": "demo-small", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx2.AsyncClient(timeout=10) as client:
        for tier, count in EXPECTED.items():
            for _ in range(count):
                response = await client.post(
                    gateway + "/v1/chat/completions",
                    json={**chat, "max_tokens": 4},
                    headers={"authorization": f"Bearer sk-demo-{tier}"},
                )
                assert response.status_code == 200, response.text
    return gateway + "/metrics"


@pytest.fixture
async def scrape_url(nursery: trio.Nursery) -> str:
    return await real_gateway(nursery)


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


async def test_prometheus_scrapes_tier_counts_and_runs_the_dashboard(
    tmp_path: Path, scrape_url: str
) -> None:
    with trio.fail_after(DEADLINE_S + 30):
        async with (
            running_prometheus(tmp_path, scrape_url) as base,
            httpx2.AsyncClient(timeout=5) as client,
        ):
            await wait_for_counts(client, base, tmp_path / "prometheus.log")
            for expr in dashboard_exprs():
                answer = await query(client, base, with_variables(expr))
                assert answer["status"] == "success", (expr, answer)
            answer = await query(client, base, "max(scheduler_tier_slo_seconds)")
            assert math.isclose(float(answer["data"]["result"][0]["value"][1]), 30.0)
