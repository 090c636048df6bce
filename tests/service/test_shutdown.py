"""Graceful shutdown: SIGTERM under load drains, finishes what is in flight, then exits, with
one process or with `--workers N` (every worker drains)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
import trio

from backends.redis.embedded import free_port
from tests.service.test_cli import wait_ready

SCHEDULER = str(Path(sys.executable).parent / "scheduler")
KEY = "sk-shutdown-test"
CONFIG = f"""
[server]
drain_timeout_s = 15
[demo_backend]
max_batch = 64
decode_base_s = 0.05
decode_per_seq_s = 0.0
[tiers.test]
weight = 1
max_wait_s = 10
max_depth = 1000
[[keys]]
key = "{KEY}"
tenant = "shutdown-test"
tier = "test"
"""
STREAMS = 20
WHOLE = 5
LATE = 10  # requests during the drain, each on a connection of its own (any worker)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_drains_then_exits(tmp_path: Path, redis_url: str, workers: int) -> None:
    config = tmp_path / "drain.toml"
    config.write_text(CONFIG)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    process = subprocess.Popen(
        [
            SCHEDULER,
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--redis-url",
            redis_url,
            "--workers",
            str(workers),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await trio.to_thread.run_sync(wait_ready, url, process)
        headers = {"authorization": f"Bearer {KEY}"}
        # 80 tokens at 50 ms a step: about four seconds each, so that the late requests below
        # all come while a worker drains (with two seconds, on a busy machine, the last of
        # them met the last worker's exit, and a connection it had accepted was reset)
        body = {
            "model": "demo-small",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 80,
        }
        results: list[tuple[str, int, str]] = []

        async def whole(client: httpx2.AsyncClient) -> None:
            r = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
            results.append(("whole", r.status_code, r.text))

        async def stream(client: httpx2.AsyncClient) -> None:
            text = ""
            async with client.stream(
                "POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers
            ) as r:
                async for chunk in r.aiter_text():
                    text += chunk
            results.append(("stream", r.status_code, text))

        limits = httpx2.Limits(max_connections=50, max_keepalive_connections=50)
        async with httpx2.AsyncClient(timeout=30, limits=limits) as client:
            with trio.fail_after(40):
                async with trio.open_nursery() as nursery:
                    for _ in range(WHOLE):
                        nursery.start_soon(whole, client)
                    for _ in range(STREAMS):
                        nursery.start_soon(stream, client)
                    await trio.sleep(0.5)  # all are in flight now
                    signalled_at = trio.current_time()
                    process.send_signal(signal.SIGTERM)
                    await trio.sleep(0.3)
                    ready: list[int] = []
                    late: list[httpx2.Response] = []
                    for _ in range(LATE):
                        async with httpx2.AsyncClient(timeout=5) as other:
                            ready.append((await other.get(url + "/readyz")).status_code)
                        async with httpx2.AsyncClient(timeout=5) as other:
                            late.append(
                                await other.post(
                                    url + "/v1/chat/completions", json=body, headers=headers
                                )
                            )
                assert ready == [503] * LATE
                for r in late:
                    assert r.status_code == 503 and "retry-after" in r.headers, r.text
                assert len(results) == WHOLE + STREAMS
                for kind, status, text in results:
                    assert status == 200, (kind, text)
                    if kind == "stream":
                        assert text.rstrip().endswith("data: [DONE]")
                exit_started = time.monotonic()
                await trio.to_thread.run_sync(lambda: process.wait(20))
                assert trio.current_time() - signalled_at < 15
                assert time.monotonic() - exit_started < 10
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)
