"""The gateway's hot path against the bare proxy, in one run: every goal of issue #16 as a
ratio (the planner's core and simulator goals are bench/core.py's and bench/sim.py's).

Each server is its own process on loopback; the load generator is this process
(`bench/load.py`: the gateway's own HTTP client, one keep-alive connection per client).

Phases (`--phase`, all by default; `--only` picks the targets of the first two):
- closed: at each of `--clients` (32 and 128), clients send requests back to back for
  `--seconds` to four targets in front of the same instant stub backend
  (`bench/stub_backend.py`): the bare proxy (`bench/bare_proxy.py`: hypercorn's trio worker,
  a raw ASGI callable and the gateway's own HTTP client; the baseline of every ratio), the
  same proxy on quart-trio (`bench/passthrough.py`, an extra row: the framework's cost), the
  gateway (`scheduler serve`, one worker) for a key with no quota, and for a key whose every
  request runs the Redis quota script ("gateway+quota"). CPU per request is each server's
  own CPU time (/proc/PID/stat) over the phase divided by the answers it gave: for the
  gateway, its process and the Redis server together (the bench starts that Redis and
  passes `--redis-url`, so that its PID is known).
- half: an open loop at half of the bare proxy's best closed-loop rate (or `--half-rate`),
  for the latency each target adds (p50 and p99 against the bare proxy's).
- slow: the gateway with `--workers 2` in front of a stub answering each request in 500 ms,
  `--slow-clients` (500) clients for `--llm-seconds` (10) from the gateway's start: req/s
  answered between 0.5 s (the first answer's earliest) and 10 s against the ideal
  (clients / 0.5 s); the same clients straight to the stub are measured too.
- sse: the same gateway, `--streams` (2,000) clients each reading streams of 50
  chat.completion.chunk events 10 ms apart, ending with `data: [DONE]`, for `--llm-seconds`:
  streams/s through the gateway (chunks received per second over the run's second half, /
  50: whole streams end in waves) against what the same clients get straight from the same
  stub in this run (the ideal), and the gateway's CPU (its processes and Redis) per chunk.
The LLM gateway's `[controller] initial_limit` is 4096 and `[backend_limits]
max_connections` 4096, so that neither the controller nor the connection pool holds the
load back (with the defaults, 16 and 512, both would); its key has the Redis quota.

Every run counts whatever is not a whole 2xx answer (the goal is none) and prints it.
The machine this runs on has 2 cores: the load generator (up to a core at 2,000 streams) and
the stub backend take CPU from the servers under test, the same for every target; read the
ratios, and the absolute rates as this machine's. The `others` column is what the rest of
the machine took meanwhile (its busy time in /proc/stat less every process measured here):
a goal row reading a run where that exceeded 0.25 cores is marked `*`, a busy machine's.
The last table is the goals'.
Run as `python bench/gateway.py` (about 3 minutes), or e.g.
`python bench/gateway.py --phase closed --only bare --only gateway+quota --clients 128
--rounds 3` (each round runs every target in turn; the throughput ratio is the rounds'
median, so that a busy spell of the machine falls on every target).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:  # run as a script: `bench` is importable from the checkout
    sys.path.insert(0, str(ROOT))

from bench.load import Load, Tally  # noqa: E402
from bench.rig import KEYS, Rig, body  # noqa: E402

PHASES = ("closed", "half", "slow", "sse")
TARGETS = ("bare", "quart", "gateway", "gateway+quota")
SLOW_S = 0.5  # the slow stub's answer time
CHUNKS, CHUNK_INTERVAL_S = 50, 0.01  # the stream stub's


BUSY_CORES = 0.25  # the rest of the machine taking more makes a run's rates suspect


@dataclass(frozen=True, slots=True)
class Goal:
    name: str
    measured: str
    against: str
    ratio: float  # measured / against, or the measured figure where a ratio means nothing
    met: bool
    busy: bool = False  # the rest of the machine took over BUSY_CORES in a run it reads


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    key: str | None
    group: str  # whose CPU time is its own, in the meter


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def failures(tally: Tally) -> str:
    said = ", ".join(f"{n} {what}" for what, n in sorted(tally.failures.items())) or "0"
    return said + (f" ({tally.cut_off} cut off by the bench's time bound)" if tally.cut_off else "")


def per_answer_ms(tally: Tally, group: str) -> float:
    return tally.cpu_s[group] / max(1, tally.answered) * 1e3


def cores(tally: Tally, group: str) -> float:
    return tally.cpu_s[group] / tally.wall_s


class Bench:
    """The phases, their tables as they run, and the goals' rows."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.goals: list[Goal] = []
        self.runs: list[tuple[str, Tally]] = []  # every load run, for its non-2xx
        self.closed: dict[tuple[str, int], list[Tally]] = {}  # one per round

    def load(self, name: str, phase: Awaitable[Tally]) -> Tally:
        tally: Tally = trio.run(lambda: phase)
        self.runs.append((name, tally))
        return tally

    def goal(
        self, name: str, measured: str, against: str, ratio: float, met: bool, *read: Tally
    ) -> None:
        """A goal's row; `read`: the runs it reads, to flag those on a busy machine."""
        busy = any(cores(t, "others") > BUSY_CORES for t in read)
        self.goals.append(Goal(name, measured, against, ratio, met, busy))

    def instant_phases(self) -> None:
        args = self.args
        with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
            rig = Rig(stack, Path(tmp))
            stub, stub_pid = rig.stub()
            meter: dict[str, list[int]] = {"backend": [stub_pid]}
            targets: dict[str, Target] = {}
            for name, script in (("bare", "bare_proxy.py"), ("quart", "passthrough.py")):
                if name in args.only:
                    url, pid = rig.proxy(script, stub)
                    meter[name], targets[name] = [pid], Target(url, None, name)
            if {"gateway", "gateway+quota"} & set(args.only):
                url, pids = rig.gateway({"demo-small": stub}, workers=1)
                meter["gateway"] = pids
                for name in ("gateway", "gateway+quota"):
                    if name in args.only:
                        targets[name] = Target(url, KEYS[name], "gateway")
            loads = {
                name: Load(t.url + "/v1/chat/completions", t.key, body("demo-small"), meter)
                for name, t in targets.items()
            }
            for load in loads.values():  # connections made, code paths warm
                trio.run(load.closed, 8, 1.0)
            if "closed" in args.phase:
                self.closed_phase(targets, loads)
            if "half" in args.phase:
                self.half_phase(targets, loads)

    def closed_phase(self, targets: dict[str, Target], loads: dict[str, Load]) -> None:
        seconds, rounds = self.args.seconds, self.args.rounds
        for clients in self.args.clients:
            print(f"\nclosed loop, c={clients}, {seconds:g} s each (CPU: ms per answer)")
            print(
                f"{'target':<17} {'req/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'own cpu':>7}"
                f" {'backend':>7} {'loadgen':>7} {'others':>12}  non-2xx"
            )
            for i, (name, target) in enumerate(t for _ in range(rounds) for t in targets.items()):
                phase = loads[name].closed(clients, seconds)
                tally = self.load(f"{name} c={clients}", phase)
                self.closed.setdefault((name, clients), []).append(tally)
                label = name if rounds == 1 else f"{name} #{i // len(targets) + 1}"
                print(
                    f"{label:<17} {len(tally.latencies) / seconds:>6.0f}"
                    f" {pct(tally.latencies, 0.5) * 1e3:>7.2f}"
                    f" {pct(tally.latencies, 0.99) * 1e3:>7.2f}"
                    f" {per_answer_ms(tally, target.group):>7.3f}"
                    f" {per_answer_ms(tally, 'backend'):>7.3f}"
                    f" {per_answer_ms(tally, 'load'):>7.3f}"
                    f" {cores(tally, 'others'):>6.2f} cores  {failures(tally)}"
                )
            self.closed_goals(clients)

    def closed_goals(self, clients: int) -> None:
        """CPU per answer over every round; the throughput ratio, the median of the rounds'
        (each round runs every target in turn, so a busy spell falls on all of them)."""
        seconds = self.args.seconds
        quota = self.closed.get(("gateway+quota", clients), [])
        bare = self.closed.get(("bare", clients), [])
        if bare:
            ms = sum(t.cpu_s["bare"] for t in bare) / sum(t.answered for t in bare) * 1e3
            self.goal(f"bare proxy CPU/req, c={clients}", f"{ms:.3f} ms", "", ms, True, *bare)
        if not quota:
            return
        ms = sum(t.cpu_s["gateway"] for t in quota) / sum(t.answered for t in quota) * 1e3
        name = f"gateway+quota+Redis CPU/req, c={clients}"
        self.goal(name, f"{ms:.3f} ms", "goal <= 1.0 ms", ms, ms <= 1.0, *quota)
        if bare:
            rps = statistics.median(len(t.latencies) / seconds for t in quota)
            base = statistics.median(len(t.latencies) / seconds for t in bare)
            ratio = statistics.median(
                len(q.latencies) / len(b.latencies) for q, b in zip(quota, bare, strict=True)
            )
            against = f"bare {base:,.0f}, goal 0.9"
            name = f"gateway+quota req/s, c={clients}"
            self.goal(name, f"{rps:,.0f}", against, ratio, ratio >= 0.9, *quota, *bare)

    def half_rate(self, loads: dict[str, Load]) -> float:
        """Half of the bare proxy's best closed-loop rate (measured now if not yet)."""
        seconds: float = self.args.seconds
        rates = [
            len(t.latencies) / seconds
            for (name, _), tallies in self.closed.items()
            if name == "bare"
            for t in tallies
        ]
        if not rates:
            if "bare" not in loads:
                raise SystemExit("the half phase needs the bare proxy's rate (--only bare)")
            clients = self.args.clients[0]
            tally = self.load("bare rate", loads["bare"].closed(clients, seconds))
            rates = [len(tally.latencies) / seconds]
            print(f"\nbare proxy, closed loop, c={clients}: {rates[0]:.0f} req/s")
        return max(rates) / 2

    def half_phase(self, targets: dict[str, Target], loads: dict[str, Load]) -> None:
        seconds, rate = self.args.seconds, self.args.half_rate or self.half_rate(loads)
        said = "--half-rate" if self.args.half_rate else "half the bare proxy's best"
        print(f"\nopen loop at {rate:.0f} req/s ({said}), {seconds:g} s each")
        print(
            f"{'target':<17} {'p50 ms':>7} {'p99 ms':>7} {'+p50 ms':>8} {'+p99 ms':>8}"
            f" {'others':>12}  non-2xx"
        )
        half: dict[str, Tally] = {}
        for name in targets:
            tally = half[name] = self.load(f"{name} half load", loads[name].open(rate, seconds))
            p50, p99 = pct(tally.latencies, 0.5), pct(tally.latencies, 0.99)
            base = half.get("bare")
            added = (
                (p50 - pct(base.latencies, 0.5), p99 - pct(base.latencies, 0.99))
                if base is not None
                else (math.nan, math.nan)
            )
            print(
                f"{name:<17} {p50 * 1e3:>7.2f} {p99 * 1e3:>7.2f} {added[0] * 1e3:>8.2f}"
                f" {added[1] * 1e3:>8.2f} {cores(tally, 'others'):>6.2f} cores  {failures(tally)}"
            )
        if "bare" in half and "gateway+quota" in half:
            base, quota = half["bare"], half["gateway+quota"]
            for q, goal_ms in ((0.5, 0.5), (0.99, 2.0)):
                added_ms = (pct(quota.latencies, q) - pct(base.latencies, q)) * 1e3
                name = f"gateway+quota added p{q * 100:.0f} at half load"
                measured, goal = f"{added_ms:.2f} ms", f"goal < {goal_ms} ms"
                self.goal(name, measured, goal, added_ms, added_ms < goal_ms, quota, base)

    def llm_phases(self) -> None:
        args = self.args
        with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
            rig = Rig(stack, Path(tmp))
            slow, slow_pid = rig.stub("--delay-s", str(SLOW_S))
            chunks = ("--chunks", str(CHUNKS), "--chunk-interval-s", str(CHUNK_INTERVAL_S))
            sse, sse_pid = rig.stub(*chunks)
            gateway, pids = rig.gateway({"slow": slow, "sse": sse}, workers=2)
            meter = {"gateway": pids, "backend": [slow_pid, sse_pid]}
            print(
                f"\nLLM-shaped: the gateway with --workers 2 ({len(pids) - 1} processes) and its"
                " Redis, [controller] initial_limit 4096 and [backend_limits] max_connections"
                " 4096 (neither holds the load back); the key with the Redis quota"
            )
            key, path = KEYS["gateway+quota"], "/v1/chat/completions"
            if "slow" in args.phase:
                request = body("slow")
                through = Load(gateway + path, key, request, meter)
                self.slow_phase(through, Load(slow + path, None, request, meter))
            if "sse" in args.phase:
                request = body("sse", stream=True)
                through = Load(gateway + path, key, request, meter)
                self.sse_phase(through, Load(sse + path, None, request, meter))

    def slow_phase(self, through: Load, direct: Load) -> None:
        clients, seconds = self.args.slow_clients, self.args.llm_seconds
        ideal = clients / SLOW_S
        print(
            f"\n{clients} clients, a backend answering in {SLOW_S * 1e3:.0f} ms: answers between"
            f" {SLOW_S:g} s and {seconds:g} s after the load starts (ideal {ideal:,.0f} req/s)"
        )
        print(
            f"{'path':<8} {'req/s':>6} {'/ideal':>6} {'p50 ms':>7} {'p99 ms':>7}"
            f" {'gateway':>13} {'others':>12}  non-2xx"
        )
        rates, tallies = {}, []
        for name, load in (("gateway", through), ("direct", direct)):
            tally = self.load(f"slow {name}", load.closed(clients, seconds))
            tallies.append(tally)
            rates[name] = rate = tally.rate_between(SLOW_S)
            print(
                f"{name:<8} {rate:>6.0f} {rate / ideal:>6.2f}"
                f" {pct(tally.latencies, 0.5) * 1e3:>7.0f} {pct(tally.latencies, 0.99) * 1e3:>7.0f}"
                f" {cores(tally, 'gateway'):>7.2f} cores {cores(tally, 'others'):>6.2f} cores"
                f"  {failures(tally)}"
            )
        ratio = rates["gateway"] / ideal
        name = f"{clients} x {SLOW_S * 1e3:.0f} ms req/s, first {seconds:g} s"
        against = f"ideal {ideal:,.0f}, goal 0.9"
        self.goal(name, f"{rates['gateway']:,.0f}", against, ratio, ratio >= 0.9, tallies[0])

    def sse_phase(self, through: Load, direct: Load) -> None:
        clients, seconds = self.args.streams, self.args.llm_seconds
        print(
            f"\n{clients} concurrent SSE streams of {CHUNKS} chunks"
            f" {CHUNK_INTERVAL_S * 1e3:.0f} ms apart, {seconds:g} s each"
            f" (streams/s: chunks/s over the second half, / {CHUNKS})"
        )
        print(
            f"{'path':<8} {'streams/s':>9} {'ttfb p50':>9} {'ttfb p99':>9} {'gateway':>12}"
            f" {'backend':>12} {'loadgen':>12} {'others':>12}  non-2xx"
        )
        rates, per_chunk_us, tallies = {}, {}, []
        for name, load in (("direct", direct), ("gateway", through)):
            tally = self.load(f"sse {name}", load.closed(clients, seconds, stream=True))
            tallies.append(tally)
            rates[name] = tally.chunk_rate_between(seconds / 2) / CHUNKS
            per_chunk_us = {g: tally.cpu_s[g] / max(1, tally.chunks) * 1e6 for g in tally.cpu_s}
            print(
                f"{name:<8} {rates[name]:>9.0f} {pct(tally.first_byte, 0.5) * 1e3:>6.1f} ms"
                f" {pct(tally.first_byte, 0.99) * 1e3:>6.1f} ms"
                f" {per_chunk_us['gateway']:>6.1f} us/ch {per_chunk_us['backend']:>6.1f} us/ch"
                f" {per_chunk_us['load']:>6.1f} us/ch"
                f" {cores(tally, 'others'):>6.2f} cores  {failures(tally)}"
            )
        ratio = rates["gateway"] / rates["direct"]
        against = f"direct {rates['direct']:,.0f}, goal 0.9"
        name = f"{clients} SSE streams/s"
        self.goal(name, f"{rates['gateway']:,.0f}", against, ratio, ratio >= 0.9, *tallies)
        us = per_chunk_us["gateway"]
        name = "gateway+Redis CPU per chunk"
        self.goal(name, f"{us:.1f} us", "goal <= 30 us", us, us <= 30, tallies[1])

    def failure_goal(self) -> None:
        failed = "; ".join(
            f"{name}: {failures(t)}" for name, t in self.runs if t.failures or t.cut_off
        )
        count = sum(sum(t.failures.values()) for _, t in self.runs)
        self.goal(f"non-2xx, {len(self.runs)} runs", f"{count:,}", "goal 0", count, count == 0)
        if failed:
            print(f"\nnot a whole 2xx answer (or cut off): {failed}")


def print_goals(goals: Sequence[Goal]) -> None:
    print(f"\n| {'goal':<42} | {'measured':>12} | {'against':<26} | {'ratio':>7} | met |")
    print(f"|{'-' * 44}|{'-' * 14}|{'-' * 28}|{'-' * 9}|-----|")
    for g in goals:
        met = ("" if not g.against else "yes" if g.met else "NO") + ("*" if g.busy else "")
        print(f"| {g.name:<42} | {g.measured:>12} | {g.against:<26} | {g.ratio:>7.2f} | {met:<4}|")
    if any(g.busy for g in goals):
        print(
            f"* in a run this row reads, the rest of the machine (other programs) took more"
            f" than {BUSY_CORES} cores: its rates and latencies are a busy machine's"
        )


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phase", action="append", choices=PHASES, help="repeatable; default all")
    parser.add_argument("--only", action="append", choices=TARGETS, help="closed/half targets")
    parser.add_argument("--clients", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--seconds", type=float, default=6.0, help="each closed/half run")
    parser.add_argument("--rounds", type=int, default=1, help="closed loops: every target, N times")
    parser.add_argument("--half-rate", type=float, help="the half phase's req/s, not measured")
    parser.add_argument("--slow-clients", type=int, default=500)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--llm-seconds", type=float, default=10.0, help="each slow/sse run")
    args = parser.parse_args(argv)
    args.phase = args.phase or list(PHASES)
    args.only = args.only or list(TARGETS)
    return args


def measure(args: argparse.Namespace) -> list[Goal]:
    """Run the chosen phases, printing their tables; the goals' rows."""
    bench = Bench(args)
    if {"closed", "half"} & set(args.phase):
        bench.instant_phases()
    if {"slow", "sse"} & set(args.phase):
        bench.llm_phases()
    bench.failure_goal()
    return bench.goals


def main() -> None:
    started = time.monotonic()
    goals = measure(parse())
    print(f"\n{time.monotonic() - started:.0f} s in all")
    print_goals(goals)


if __name__ == "__main__":
    main()
