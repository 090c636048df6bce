"""Graceful shutdown: SIGTERM under load drains, finishes what is in flight, then exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import trio

from scheduler.service.redis_embedded import free_port
from tests.service.test_cli import wait_ready

SCHEDULER = str(Path(sys.executable).parent / "scheduler")
CONFIG = """
[server]
drain_timeout_s = 15
[demo_backend]
max_batch = 32
decode_base_s = 0.05
decode_per_seq_s = 0.0
"""


async def test_sigterm_drains_then_exits(tmp_path: Path, redis_url: str) -> None:
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
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await trio.to_thread.run_sync(wait_ready, url, process)
        headers = {"authorization": "Bearer sk-demo-enterprise"}
        # 40 tokens at 50 ms a step: about two seconds each
        body = {
            "model": "demo-small",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 40,
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
                    for _ in range(5):
                        nursery.start_soon(whole, client)
                        nursery.start_soon(stream, client)
                    await trio.sleep(0.5)  # all ten are in flight now
                    signalled_at = trio.current_time()
                    process.send_signal(signal.SIGTERM)
                    await trio.sleep(0.3)
                    async with httpx2.AsyncClient(timeout=5) as other:
                        ready = await other.get(url + "/readyz")
                        late = await other.post(
                            url + "/v1/chat/completions", json=body, headers=headers
                        )
                assert ready.status_code == 503
                assert late.status_code == 503 and "retry-after" in late.headers
                assert len(results) == 10
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
