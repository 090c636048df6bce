"""What idle keep-alive connections cost the gateway, and whether it gets the memory back.

Starts `scheduler serve` (the demo, one worker) as a child, then, `--rounds` times: opens
`--connections` loopback connections that each carry one `GET /healthz` and then sit idle,
reads the gateway's resident set (VmRSS in /proc/<pid>/status), closes them all, and reads it
again once the gateway has seen every close. Run as `python bench/idle_connections.py`; one
line per round, in MB. A leak grows the "closed" column round after round; allocator retention
keeps it flat after the first round.
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEDULER = str(Path(sys.executable).parent / "scheduler")
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"
BATCH = 500  # connections opened before their answers are read: under the listen backlog
FD_SLACK = 8


@dataclass(frozen=True)
class Round:
    open_mb: float
    closed_mb: float


def rss_mb(pid: int) -> float:
    """The process's resident set, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_fd_limit(wanted: int) -> int:
    """The soft limit on open files raised to `wanted` (at most the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def gateway(port: int, timeout_s: float = 30.0) -> Iterator[subprocess.Popen[bytes]]:
    """`scheduler serve` on `port`, ready; stopped (SIGINT, then killed) on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    process = subprocess.Popen(
        [SCHEDULER, "serve", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_answering(port, process, time.monotonic() + timeout_s)
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def wait_answering(port: int, process: subprocess.Popen[bytes], deadline_at: float) -> None:
    while time.monotonic() < deadline_at:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with status {process.returncode}")
        try:
            open_idle(port, 1, deadline_at)[0].close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the gateway did not answer in time")


def open_idle(port: int, count: int, deadline_at: float) -> list[socket.socket]:
    """`count` connections, each answered once (200) and left open, idle."""
    idle: list[socket.socket] = []
    try:
        while len(idle) < count:
            batch = []
            for _ in range(min(BATCH, count - len(idle))):
                batch.append(socket.create_connection(("127.0.0.1", port), timeout=10))
                idle.append(batch[-1])
            for sock in batch:
                sock.sendall(REQUEST)
            read_answers(batch, deadline_at)
    except BaseException:
        for sock in idle:
            sock.close()
        raise
    return idle


def read_answers(batch: list[socket.socket], deadline_at: float) -> None:
    """Until every socket in `batch` has a whole 200 response head and body."""
    pending = {sock: b"" for sock in batch}
    with selectors.DefaultSelector() as selector:
        for sock in batch:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, sock)
        while pending:
            remaining_s = deadline_at - time.monotonic()
            if remaining_s <= 0:
                raise TimeoutError(f"{len(pending)} connections unanswered")
            for key, _ in selector.select(timeout=remaining_s):
                ready: socket.socket = key.data
                data = ready.recv(65536)
                if not data:
                    raise ConnectionError("the gateway closed a connection it had not answered")
                pending[ready] += data
                if answered(pending[ready]):
                    selector.unregister(ready)
                    del pending[ready]


def answered(received: bytes) -> bool:
    head, sep, body = received.partition(b"\r\n\r\n")
    if not sep:
        return False
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"unexpected answer {head[:40]!r}")
    lines = head.lower().split(b"\r\n")
    length = next(int(x.split(b":", 1)[1]) for x in lines if x.startswith(b"content-length:"))
    return len(body) >= length


def wait_fds_at_most(pid: int, count: int, deadline_at: float) -> None:
    """Until the gateway holds at most `count` descriptors (it has let every closed
    connection go)."""
    while open_fds(pid) > count:
        if time.monotonic() > deadline_at:
            raise TimeoutError(f"the gateway still holds {open_fds(pid)} descriptors")
        time.sleep(0.05)


def one_round(
    pid: int, port: int, connections: int, baseline_fds: int, settle_s: float, close_s: float
) -> Round:
    """Open `connections` idle ones, measure, close them, wait (up to `close_s`) until the
    gateway has let them go, measure again."""
    idle = open_idle(port, connections, time.monotonic() + 60)
    time.sleep(settle_s)
    open_mb = rss_mb(pid)
    for sock in idle:
        sock.close()
    # a few descriptors of slack: the gateway's own pools to Redis and the backend may grow
    wait_fds_at_most(pid, baseline_fds + FD_SLACK, time.monotonic() + close_s)
    time.sleep(settle_s)
    return Round(open_mb, rss_mb(pid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--settle-s", type=float, default=1.0)
    args = parser.parse_args()
    limit = raise_fd_limit(args.connections + 256)
    connections = min(args.connections, limit - 256)
    port = free_port()
    with gateway(port) as process:
        time.sleep(args.settle_s)
        baseline_fds = open_fds(process.pid)
        start_mb = rss_mb(process.pid)
        print(f"{connections} connections; gateway at start {start_mb:.1f} MB")
        for n in range(1, args.rounds + 1):
            r = one_round(process.pid, port, connections, baseline_fds, args.settle_s, 30)
            per_1000 = (r.open_mb - r.closed_mb) / connections * 1000
            print(
                f"round {n}: open {r.open_mb:.1f} MB, closed {r.closed_mb:.1f} MB "
                f"({per_1000:.2f} MB per 1000 open)"
            )


if __name__ == "__main__":
    main()
