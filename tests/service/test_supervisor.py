"""`scheduler serve --workers N`, for real: the parent supervises its worker processes.

Each test starts the real command (and the demo backend) as subprocesses on free ports, and
follows the parent's stderr, where it says which worker pid is serving and which died.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import trio

from backends.redis.embedded import free_port
from tests.service.test_cli import wait_ready

SCHEDULER = str(Path(sys.executable).parent / "scheduler")
KEY = "sk-supervisor-test"
ADMIN_TOKEN = "admin-supervisor-test"
HEADERS = {"authorization": f"Bearer {KEY}"}
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "demo-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
CONFIG = """
[server]
drain_timeout_s = 10

[tiers.test]
weight = 1
max_wait_s = 10
max_depth = 1000

[[keys]]
key = "{key}"
tenant = "supervisor-test"
tier = "test"

[models.demo-small]
backends = ["{demo}"]
"""
SERVING = re.compile(r"worker (\d+) serving")


@dataclass
class Gateway:
    """A running `scheduler serve` and what its stderr said, line by line, with the time."""

    process: subprocess.Popen[str]
    url: str
    lines: list[tuple[float, str]] = field(default_factory=list)

    def follow(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def serving(self) -> list[tuple[float, int]]:
        """(when, pid) of every "worker P serving" line so far."""
        found = [(at, SERVING.search(line)) for at, line in list(self.lines)]
        return [(at, int(m.group(1))) for at, m in found if m]

    def wait_serving(self, count: int, timeout_s: float = 20) -> list[tuple[float, int]]:
        deadline = time.monotonic() + timeout_s
        while len(self.serving()) < count:
            assert self.process.poll() is None, self.text()
            assert time.monotonic() < deadline, f"not {count} workers serving:\n{self.text()}"
            time.sleep(0.02)
        return self.serving()

    def text(self) -> str:
        return "\n".join(line for _, line in list(self.lines))


@contextmanager
def demo_backend(decode_base_s: float = 0.001) -> Iterator[str]:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "backends.demo.server",
        "--port",
        str(port),
        "--model",
        "demo-small",
    ]
    args += ["--decode-base-s", str(decode_base_s), "--decode-per-seq-s", "0", "--max-batch", "64"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None and time.monotonic() < deadline
            try:
                httpx2.get(url + "/health", timeout=1)
                break
            except httpx2.HTTPError:
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def gateway(tmp_path: Path, redis_url: str, demo_url: str, workers: int = 2) -> Iterator[Gateway]:
    config = tmp_path / "supervised.toml"
    config.write_text(CONFIG.format(key=KEY, demo=demo_url))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    env["SCHEDULER_ADMIN_TOKEN"] = ADMIN_TOKEN
    args = [SCHEDULER, "serve", "--config", str(config), "--port", str(port)]
    args += ["--workers", str(workers), "--redis-url", redis_url]
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    served = Gateway(process, f"http://127.0.0.1:{port}")
    reader = threading.Thread(target=served.follow, daemon=True)
    reader.start()
    try:
        yield served
    finally:
        if process.poll() is None:
            process.kill()  # its workers notice their parent is gone and leave
        process.wait(10)
        reader.join(10)


def one_request(url: str, method: str = "POST", path: str = "/v1/chat/completions") -> int:
    """One request on a connection of its own: the kernel picks the worker each time."""
    headers = ADMIN if path.startswith("/admin/") else HEADERS
    with httpx2.Client(timeout=5, headers=headers) as client:
        if method == "GET":
            return client.get(url + path).status_code
        return client.post(url + path, json=CHAT).status_code


def metric(url: str, name: str) -> float:
    text = httpx2.get(url + "/metrics", timeout=5).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


async def test_a_killed_worker_is_replaced_while_the_other_keeps_serving(
    tmp_path: Path, redis_url: str
) -> None:
    with ExitStack() as stack:
        demo = stack.enter_context(demo_backend())
        served = stack.enter_context(gateway(tmp_path, redis_url, demo))
        (_, victim), (_, survivor) = served.wait_serving(2)
        await trio.to_thread.run_sync(wait_ready, served.url, served.process)
        min_limit = metric(served.url, "scheduler_controller_min_limit")
        outcomes: list[tuple[float, int | str]] = []

        async def trickle(until_at: float) -> None:
            while time.monotonic() < until_at:  # 20 requests a second, each on a new connection
                try:
                    status: int | str = await trio.to_thread.run_sync(one_request, served.url)
                except httpx2.HTTPError as exc:
                    status = type(exc).__name__
                outcomes.append((time.monotonic(), status))
                await trio.sleep(0.05)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle, time.monotonic() + 3.0)
                await trio.sleep(0.8)
                killed_at = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                serving = await trio.to_thread.run_sync(served.wait_serving, 3)
        served_at, replacement = serving[2]
        assert replacement not in (victim, survivor)
        assert served_at - killed_at < 1.0, served.text()
        failed = [(at - killed_at, status) for at, status in outcomes if status != 200]
        # only a request in flight on the killed worker may fail, nothing after it
        assert len(failed) <= 2 and all(-0.1 < at < 0.5 for at, _ in failed), failed
        assert len([at for at, _ in outcomes if at > served_at]) >= 5  # went on after it
        assert served.process.poll() is None
        # the dead worker's live gauges left the merge: two workers' worth, not three
        assert metric(served.url, "scheduler_controller_min_limit") == min_limit
        assert "SIGKILL" in served.text()
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(20) == 0, served.text()


async def test_workers_dying_again_and_again_make_the_parent_exit_non_zero(
    tmp_path: Path, redis_url: str
) -> None:
    with ExitStack() as stack:
        demo = stack.enter_context(demo_backend())
        served = stack.enter_context(gateway(tmp_path, redis_url, demo))
        killed: set[int] = set()
        deadline = time.monotonic() + 20
        while served.process.poll() is None:
            assert time.monotonic() < deadline, served.text()
            for _, pid in served.serving():
                if pid not in killed:
                    killed.add(pid)
                    # the parent may have stopped it already (giving up) before it is read here
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        assert served.process.wait(5) != 0
        assert 3 <= len(killed) <= 8, killed
        assert "giving up" in served.text()


def test_a_worker_that_dies_before_serving_makes_the_parent_exit_non_zero() -> None:
    script = textwrap.dedent(
        """
        import sys
        from scheduler.service.supervisor import Supervisor

        def crash(pipes: object) -> int:
            raise RuntimeError("this worker cannot start")

        sys.exit(Supervisor(2, crash).run())
        """
    )
    started_at = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20
    )
    assert result.returncode != 0
    assert time.monotonic() - started_at < 10
    assert "before serving" in result.stderr and "giving up" in result.stderr, result.stderr


async def test_admin_drain_drains_every_worker_and_undrain_brings_them_back(
    tmp_path: Path, redis_url: str
) -> None:
    with ExitStack() as stack:
        demo = stack.enter_context(demo_backend())
        served = stack.enter_context(gateway(tmp_path, redis_url, demo))
        await trio.to_thread.run_sync(wait_ready, served.url, served.process)

        def statuses(method: str, path: str, count: int = 30) -> list[int]:
            return [one_request(served.url, method, path) for _ in range(count)]

        with trio.fail_after(30):
            assert statuses("GET", "/readyz") == [200] * 30
            assert one_request(served.url, "POST", "/admin/v1/drain") == 200
            assert statuses("GET", "/readyz") == [503] * 30
            assert statuses("POST", "/v1/chat/completions", 10) == [503] * 10
            assert one_request(served.url, "POST", "/admin/v1/undrain") == 200
            assert statuses("GET", "/readyz") == [200] * 30
            assert statuses("POST", "/v1/chat/completions", 10) == [200] * 10
            # a drained process stays drained when a worker is replaced
            assert one_request(served.url, "POST", "/admin/v1/drain") == 200
            os.kill(served.wait_serving(2)[0][1], signal.SIGKILL)
            served.wait_serving(3)
            assert statuses("GET", "/readyz") == [503] * 30
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(20) == 0, served.text()


async def test_sighup_to_the_parent_reloads_the_gains_of_every_worker(
    tmp_path: Path, redis_url: str
) -> None:
    with ExitStack() as stack:
        demo = stack.enter_context(demo_backend())
        served = stack.enter_context(gateway(tmp_path, redis_url, demo))
        served.wait_serving(2)
        await trio.to_thread.run_sync(wait_ready, served.url, served.process)
        config = tmp_path / "supervised.toml"
        config.write_text(config.read_text() + "\n[controller]\nincrease_step = 7\n")

        def gains() -> list[float]:  # each on a connection of its own: both workers answer
            return [
                httpx2.get(served.url + "/admin/v1/controller", headers=ADMIN, timeout=5).json()[
                    "gains"
                ]["increase_step"]
                for _ in range(20)
            ]

        assert 7 not in gains()
        served.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (seen := await trio.to_thread.run_sync(gains)) != [7] * 20:
            assert time.monotonic() < deadline, seen
            await trio.sleep(0.1)
        assert served.process.poll() is None
        assert len(served.serving()) == 2  # reloaded, not restarted
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(20) == 0, served.text()
