"""The README's first command, for real: `scheduler serve` with no config serves the demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from scheduler.service.redis_embedded import free_port

SCHEDULER = str(Path(sys.executable).parent / "scheduler")
CHAT = {"model": "demo-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def wait_ready(url: str, process: subprocess.Popen[str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        try:
            if httpx2.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("the gateway did not become ready")


@pytest.mark.parametrize("workers", [1, 2])
def test_scheduler_serve_runs_the_demo(workers: int) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    process = subprocess.Popen(
        [SCHEDULER, "serve", "--port", str(port), "--workers", str(workers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        for key in ("sk-demo-free", "sk-demo-pro", "sk-demo-enterprise"):
            r = httpx2.post(
                url + "/v1/chat/completions",
                json=CHAT,
                headers={"authorization": f"Bearer {key}"},
                timeout=10,
            )
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 5
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output
    assert "sk-demo-pro" in output
    with pytest.raises(httpx2.HTTPError):
        httpx2.get(url + "/healthz", timeout=1)


def test_invalid_config_stops_start_up_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[tiers.free]\nweight = -2\n")
    result = subprocess.run(
        [SCHEDULER, "serve", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "tiers.free.weight" in result.stderr
    assert "Traceback" not in result.stderr
