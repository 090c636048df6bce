"""Idle keep-alive connections: the gateway lets a closed one go at once, and rounds of them do
not grow its memory.

The gateway runs as `scheduler serve` (its own process, so its VmRSS and its open descriptors
are its alone); the connections each carry one `GET /healthz` and then sit idle, on loopback.
hypercorn used to hold a connection the client had closed, with its socket and its memory,
until `keep_alive_timeout` (75 s) ran out; `scheduler/service/http1.py` now lets it go.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bench.idle_connections import (
    FD_SLACK,
    free_port,
    gateway,
    one_round,
    open_fds,
    open_idle,
    raise_fd_limit,
    wait_fds_at_most,
)

CONNECTIONS = 2000  # about 40 MB of the gateway's memory while open
ROUNDS = 3
CLOSE_S = 15.0  # the gateway lets 2,000 closed connections go in ~1-5 s on a busy 2-core box
SETTLE_S = 0.5
MARGIN_MB = 10.0  # round-to-round noise is ~4 MB; a leak of 5 KB a connection is 20 MB by round 3


@dataclass(frozen=True)
class Gateway:
    pid: int
    port: int
    baseline_fds: int


@pytest.fixture(scope="module")
def served() -> Iterator[Gateway]:
    assert raise_fd_limit(CONNECTIONS + 256) >= CONNECTIONS + 256  # the gateway inherits it
    port = free_port()
    with gateway(port) as process:
        time.sleep(SETTLE_S)
        yield Gateway(process.pid, port, open_fds(process.pid))


def test_a_closed_idle_connection_is_let_go_at_once(served: Gateway) -> None:
    idle = open_idle(served.port, 100, time.monotonic() + 20)
    assert open_fds(served.pid) >= served.baseline_fds + 100
    for sock in idle:
        sock.close()
    wait_fds_at_most(served.pid, served.baseline_fds + FD_SLACK, time.monotonic() + 5)


def test_rounds_of_idle_connections_do_not_grow_memory(served: Gateway) -> None:
    rounds = [
        one_round(served.pid, served.port, CONNECTIONS, served.baseline_fds, SETTLE_S, CLOSE_S)
        for _ in range(ROUNDS)
    ]
    ceiling_mb = rounds[0].open_mb + MARGIN_MB
    for n, r in enumerate(rounds, 1):
        assert r.open_mb <= ceiling_mb, f"round {n}: {rounds}"
        assert r.closed_mb <= ceiling_mb, f"round {n}: {rounds}"
