"""The README's first command, for real: `scheduler serve` with no config serves the demo."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from backends.redis.embedded import free_port

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
    # the demo's quotas are said at start-up, as the README shows them
    assert "tier free: 10 requests and 10000 tokens per 60 s per key (sliding_log)" in output
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


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_is_one_line_and_nothing_says_serving(workers: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [SCHEDULER, "serve", "--port", str(port), "--workers", str(workers)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode != 0
    assert (
        result.stderr == f"scheduler: cannot listen on 127.0.0.1:{port}: address already in use\n"
    )
    assert "serving on" not in result.stdout


def test_a_bad_host_is_one_line_naming_it() -> None:
    result = subprocess.run(
        [SCHEDULER, "serve", "--host", "no-such-host.invalid", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "scheduler: cannot listen on no-such-host.invalid:"
    ), result.stderr
    assert "serving on" not in result.stdout


def test_a_config_without_keys_says_so_once_and_lets_no_demo_key_in(
    tmp_path: Path, redis_url: str
) -> None:
    config = tmp_path / "prod.toml"
    config.write_text('[server]\ndrain_timeout_s = 1\n[models.x]\nbackends = ["demo"]\n')
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    env["SCHEDULER_KEY_SECRET"] = "a-production-secret"
    args = [SCHEDULER, "serve", "--config", str(config), "--port", str(port)]
    process = subprocess.Popen(
        [*args, "--redis-url", redis_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        r = httpx2.post(
            url + "/v1/chat/completions",
            json={**CHAT, "model": "x"},
            headers={"authorization": "Bearer sk-demo-enterprise"},
            timeout=10,
        )
        assert r.status_code == 401, r.text
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output
    said = [line for line in output.splitlines() if "no API keys configured" in line]
    assert len(said) == 1, output
    assert "demo keys" not in output and "sk-demo" not in output
