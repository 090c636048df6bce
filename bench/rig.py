"""The processes of bench/gateway.py: each server its own process on loopback, started and
stopped with an ExitStack, and the gateway's bench config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx2

from backends.redis.embedded import EmbeddedRedis, free_port
from bench.load import with_descendants

ROOT = Path(__file__).resolve().parent.parent


def body(model: str, *, stream: bool = False) -> bytes:
    messages = [{"role": "user", "content": "hello"}]
    document = {"model": model, "messages": messages, "max_tokens": 16, "stream": stream}
    return json.dumps(document).encode()


GATEWAY_TOML = """
[server]
default_max_tokens = 16
[tiers.pro]
weight = 3
max_wait_s = 30
max_depth = 100000
[tiers.enterprise]
weight = 8
max_wait_s = 30
max_depth = 100000
[tiers.enterprise.quota]
algorithm = "gcra"
requests = 100000000
tokens = 1000000000
[tiers.free]
weight = 1
max_wait_s = 30
max_depth = 100000
[[keys]]
key = "sk-bench"
tenant = "bench"
tier = "pro"
[[keys]]
key = "sk-bench-quota"
tenant = "bench-quota"
tier = "enterprise"
[backend_limits]
max_connections = 4096
[controller]
initial_limit = 4096
max_limit = 8192
"""
KEYS = {"gateway": "sk-bench", "gateway+quota": "sk-bench-quota"}


def gateway_toml(models: dict[str, str]) -> str:
    """The bench's gateway config, one model per backend URL (no pressure probe: the stub
    has no /metrics)."""
    tables = [
        f'[models.{name}]\nbackends = ["{url}"]\n[models.{name}.pressure]\nenabled = false\n'
        for name, url in models.items()
    ]
    return GATEWAY_TOML + "".join(tables)


def start(stack: ExitStack, args: list[str], port: int, env: dict[str, str] | None = None) -> int:
    """Start `args` (listening on `port`) until `stack` closes, and wait until it answers on
    loopback; its PID."""
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    def stop() -> None:
        process.terminate()
        process.wait(15)

    stack.callback(stop)
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx2.get(f"http://127.0.0.1:{port}/", timeout=1)
            return process.pid
        except httpx2.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args[:3]} did not start") from None
            time.sleep(0.1)


class Rig:
    """The processes of one group of phases, stopped when its stack closes."""

    def __init__(self, stack: ExitStack, tmp: Path) -> None:
        self._stack, self._tmp = stack, tmp
        redis = stack.enter_context(EmbeddedRedis())
        assert redis.process is not None
        self.redis_url, self.redis_pid = redis.url, redis.process.pid

    def start(self, args: list[str], port: int, env: dict[str, str] | None = None) -> int:
        return start(self._stack, args, port, env)

    def stub(self, *args: str) -> tuple[str, int]:
        port = free_port()
        script = str(ROOT / "bench" / "stub_backend.py")
        pid = self.start([sys.executable, script, "--port", str(port), *args], port)
        return f"http://127.0.0.1:{port}", pid

    def proxy(self, script: str, upstream: str) -> tuple[str, int]:
        port = free_port()
        args = [sys.executable, str(ROOT / "bench" / script), "--port", str(port)]
        pid = self.start([*args, "--upstream", upstream], port)
        return f"http://127.0.0.1:{port}", pid

    def gateway(self, models: dict[str, str], workers: int) -> tuple[str, list[int]]:
        """`scheduler serve` on this rig's Redis; its URL, and its PIDs with the Redis's."""
        port = free_port()
        config = self._tmp / f"gateway-{port}.toml"
        config.write_text(gateway_toml(models))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
        scheduler = str(Path(sys.executable).parent / "scheduler")
        args = [scheduler, "serve", "--config", str(config), "--port", str(port)]
        args += ["--workers", str(workers), "--redis-url", self.redis_url]
        pid = self.start(args, port, env)
        return f"http://127.0.0.1:{port}", [*with_descendants(pid), self.redis_pid]
