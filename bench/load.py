"""The load generator and CPU meter of bench/gateway.py.

The load generator is the gateway's own HTTP client (`backends.http.client`): one keep-alive
connection per client, the cheapest client this stack has, since on a 2-core machine every
microsecond it spends is taken from the servers under test. Every loop is bounded in time
(it starts nothing after `seconds`, and cuts off what is still running `GRACE_S` later) and
in count (`MAX_RATE` requests per second at most). Anything but a whole 2xx answer (a stream:
ending with `data: [DONE]`) is counted in `Tally.failures`, by cause; what the time bound cut
off, in `Tally.cut_off`.

CPU time is read from the processes themselves (/proc/PID/stat, utime + stime), so a server's
CPU per request is its own, whatever else the machine runs; the machine's busy time
(/proc/stat) less all of that is what the rest of the machine took meanwhile ("others"),
which says whether a run's rates are this machine's or a busy machine's.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from backends.http.client import BackendError, BackendLimits, HttpClient

GRACE_S = 15.0  # after the load's end, for the answers still on their way
MAX_RATE = 20_000  # requests per second at most, far above what one machine serves here
OPEN_CONNECTIONS = 256  # an open loop's, at most: past them requests wait (and it shows)
DONE = b"data: [DONE]\n\n"
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass
class Tally:
    """What one load phase saw; times are in seconds since the load started."""

    seconds: float  # how long requests were started for
    latencies: list[float] = field(default_factory=list)  # of whole 2xx answers
    done_at: list[float] = field(default_factory=list)  # when each of them ended
    first_byte: list[float] = field(default_factory=list)  # streams: time to the first chunk
    chunks: int = 0  # streams: content events received (not counting [DONE])
    chunks_at: Counter[int] = field(default_factory=Counter)  # the same, by 0.1 s since start
    started: int = 0  # requests sent
    cut_off: int = 0  # still unanswered `GRACE_S` after the load's end (the bench's bound)
    failures: Counter[str] = field(default_factory=Counter)  # non-2xx (by status), broken, ...
    # over the phase, per metered process group, "load" (this process) and "others" (the
    # rest of the machine's busy time: other programs, and the kernel's work for everyone)
    cpu_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0  # the phase, first request to last answer

    @property
    def answered(self) -> int:
        return len(self.latencies) + sum(self.failures.values())

    def rate_between(self, since: float) -> float:
        """Whole 2xx answers per second that ended between `since` and `seconds`."""
        ended = sum(1 for t in self.done_at if since <= t <= self.seconds)
        return ended / (self.seconds - since)

    def chunk_rate_between(self, since: float) -> float:
        """Stream chunks per second received between `since` and `seconds` (a steady rate
        where whole streams end in waves)."""
        received = sum(n for at, n in self.chunks_at.items() if since <= at / 10 < self.seconds)
        return received / (self.seconds - since)


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU time of these processes so far (the living ones)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS_PER_S


def machine_busy_seconds() -> float:
    """CPU time every core of the machine has spent busy so far (not idle, not waiting on I/O)."""
    with open("/proc/stat") as stat:
        ticks = [int(n) for n in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICKS_PER_S


def with_descendants(pid: int) -> list[int]:
    """`pid` and every process under it (a gateway's workers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            parents[int(entry.name)] = int(fields[1])
    family, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    return sorted(family)


def headers_for(key: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    return headers


def refusal(status: int, body: bytes) -> str:
    """A non-2xx answer as its status and, for the gateway's refusals, their reason ("503
    redis_unverified"; else the error's code): the cause, not only the count."""
    try:
        error = json.loads(body)["error"]
        cause = error.get("reason") or error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        cause = None
    return f"{status} {cause}" if isinstance(cause, str) else str(status)


Spawn = Callable[[trio.Nursery, HttpClient, float], Awaitable[None]]


class Load:
    """Load phases on `url`, metered: `meter` names the process groups whose CPU time each
    phase reads before and after (this load generator's own is added as "load")."""

    def __init__(self, url: str, key: str | None, body: bytes, meter: dict[str, list[int]]) -> None:
        self._url, self._headers, self._body = url, headers_for(key), body
        self._meter = meter

    async def closed(self, clients: int, seconds: float, *, stream: bool = False) -> Tally:
        """`clients` clients, each sending its next request when its last one is answered."""
        tally = Tally(seconds)
        budget = [int(MAX_RATE * seconds)]

        async def client(http: HttpClient, start_at: float) -> None:
            while trio.current_time() < start_at + seconds and budget[0] > 0:
                budget[0] -= 1
                await self._one(http, tally, start_at, stream)

        async def spawn(nursery: trio.Nursery, http: HttpClient, start_at: float) -> None:
            for _ in range(clients):
                nursery.start_soon(client, http, start_at)

        return await self._metered(tally, clients, spawn)

    async def open(self, rate: float, seconds: float) -> Tally:
        """Requests started at a fixed `rate`, whether or not the earlier ones were answered."""
        tally = Tally(seconds)
        count = min(int(rate * seconds), int(MAX_RATE * seconds))

        async def spawn(nursery: trio.Nursery, http: HttpClient, start_at: float) -> None:
            for i in range(count):
                await trio.sleep_until(start_at + i / rate)
                nursery.start_soon(self._one, http, tally, start_at, False, start_at + i / rate)

        return await self._metered(tally, OPEN_CONNECTIONS, spawn)

    async def _metered(self, tally: Tally, connections: int, spawn: Spawn) -> Tally:
        """Run `spawn`'s requests to their end (or `GRACE_S` past the load's), metered."""
        before = {name: cpu_seconds(pids) for name, pids in self._meter.items()}
        own, machine = time.process_time(), machine_busy_seconds()
        http = HttpClient(BackendLimits(max_connections=connections, keepalive_s=60.0))
        start_at = trio.current_time()
        try:
            with trio.move_on_at(start_at + tally.seconds + GRACE_S):
                async with trio.open_nursery() as nursery:
                    await spawn(nursery, http, start_at)
        finally:
            http.close()
        tally.wall_s = trio.current_time() - start_at
        tally.cpu_s = {name: cpu_seconds(self._meter[name]) - cpu for name, cpu in before.items()}
        tally.cpu_s["load"] = time.process_time() - own
        tally.cpu_s["others"] = machine_busy_seconds() - machine - sum(tally.cpu_s.values())
        tally.cut_off = tally.started - tally.answered
        return tally

    async def _one(
        self,
        http: HttpClient,
        tally: Tally,
        start_at: float,
        stream: bool,
        due_at: float | None = None,
    ) -> None:
        """One request; its latency counts from `due_at` when given (an open loop's schedule:
        a late start is the load generator's delay, still the client's wait)."""
        tally.started += 1
        started = trio.current_time() if due_at is None else due_at
        try:
            if stream:
                failure = await self._stream(http, tally, start_at, started)
            else:
                request = http.request(
                    "POST", self._url, headers=self._headers, body=self._body, timeout_s=60.0
                )
                status, answer = await request
                failure = None if 200 <= status < 300 else refusal(status, answer)
        except BackendError as exc:
            failure = type(exc).__name__
        if failure is not None:
            tally.failures[failure] += 1
            return
        now = trio.current_time()
        tally.latencies.append(now - started)
        tally.done_at.append(now - start_at)

    async def _stream(
        self, http: HttpClient, tally: Tally, start_at: float, started: float
    ) -> str | None:
        """One stream read to its end: None if whole, else what went wrong."""
        pool, target = http.pool_for(self._url)
        async with pool.stream("POST", target, self._headers, self._body, 60.0) as response:
            if not 200 <= response.status_code < 300:
                return refusal(response.status_code, await response.read())
            tail, first = b"", True
            async for piece in response.chunks():
                if first:
                    tally.first_byte.append(trio.current_time() - started)
                    first = False
                events = piece.count(b"data: {")
                tally.chunks += events
                tally.chunks_at[int((trio.current_time() - start_at) * 10)] += events
                tail = (tail + piece)[-len(DONE) :]
        return None if tail == DONE else "stream without [DONE]"
