"""The simulator's command line: `python -m sim SCENARIO.toml` (and `scheduler sim`).

    python -m sim spike                                  # a shipped scenario, by name
    python -m sim my.toml --out out/ --seed 7            # report.json and PNG plots in out/
    python -m sim spike --compare-controllers --out out/
    python -m sim spike --sweep backends=1..16 --out out/
    python -m sim spike --sweep increase_step=1,2,4 --sweep decrease_factor=0.5,0.7,0.9

Tables go to stdout, errors and progress to stderr: a bar redrawn in place on a terminal (or
with --progress), a line every 10% otherwise (a log or a pipe), nothing with --no-progress.
Exit status 2 for a bad scenario or option.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from sim.compare import best, compare_controllers, compare_table, gate_mode_verdict
from sim.engine import SimResult, simulate
from sim.engine.model import Scenario
from sim.progress import ProgressBar
from sim.report import format_table, result_json, summary, write_json
from sim.scenario import ScenarioError, load_scenario
from sim.sweep import (
    BackendRow,
    GainRow,
    SweepError,
    SweepSpec,
    best_gains,
    parse_sweep,
    pick_backends,
    sweep_backends,
    sweep_gains,
    top_tier,
)


def build_parser(prog: str = "python -m sim") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Simulate the scheduler on a scenario in virtual time.",
    )
    parser.add_argument("scenario", help="a scenario TOML file, or the name of a shipped one")
    parser.add_argument("--out", metavar="DIR", help="write report JSON and PNG plots here")
    parser.add_argument("--seed", type=int, help="override the scenario's seed")
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="backends=1..16, or a controller gain: increase_step=0.5,1,2 (repeatable)",
    )
    parser.add_argument(
        "--compare-controllers",
        action="store_true",
        help="AIMD rate, AIMD window, fixed and gradient side by side",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar (default: on a terminal; elsewhere a line every 10%%)",
    )
    return parser


class _ProgressLines:
    """Progress for a log or a pipe, where a bar redrawn with \r would be one endless line:
    a line at each tenth done, with the wall time so far."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self._stream = stream
        self._label = label
        self._tenths = -1
        self._started = time.perf_counter()

    def __call__(self, fraction: float) -> None:
        tenths = max(0, min(10, int(fraction * 10)))
        if tenths == self._tenths:
            return
        self._tenths = tenths
        wall_s = time.perf_counter() - self._started
        self._stream.write(f"{self._label}: {10 * tenths}% ({wall_s:.0f} s)\n")
        self._stream.flush()

    def close(self) -> None:
        pass


class _Progress:
    """Hands out one progress bar per run, closing the previous one."""

    def __init__(self, wanted: bool | None) -> None:
        """`wanted`: True a bar, False nothing, None a bar on a terminal and lines elsewhere."""
        self.enabled = wanted is not False
        self.bar = wanted or (wanted is None and sys.stderr.isatty())
        self._bar: ProgressBar | _ProgressLines | None = None

    def __call__(self, label: str, index: int, total: int) -> Callable[[float], None] | None:
        self.close()
        if not self.enabled:
            return None
        suffix = f" ({index + 1}/{total})" if total > 1 else ""
        kind = ProgressBar if self.bar else _ProgressLines
        self._bar = kind(sys.stderr, f"{label}{suffix}")
        return self._bar

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    args = (build_parser(prog) if prog else build_parser()).parse_args(argv)
    try:
        scenario = load_scenario(args.scenario)
        sweeps = [parse_sweep(text) for text in args.sweep]
    except (ScenarioError, SweepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    progress = _Progress(args.progress)
    try:
        if args.compare_controllers:
            _compare(scenario, args.seed, out, progress)
        backends = [s for s in sweeps if s.name == "backends"]
        gains = [s for s in sweeps if s.name != "backends"]
        for spec in backends:
            _sweep_backends(scenario, spec, args.seed, out, progress)
        if gains:
            _sweep_gains(scenario, gains, args.seed, out, progress)
        if not sweeps and not args.compare_controllers:
            _single(scenario, args.seed, out, progress)
    except SweepError as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress.close()
    return 0


def _single(scenario: Scenario, seed: int | None, out: Path | None, progress: _Progress) -> None:
    started = time.perf_counter()
    result = simulate(scenario, seed=seed, on_progress=progress(scenario.name, 0, 1))
    wall_s = time.perf_counter() - started
    progress.close()
    print(summary(result, wall_s=wall_s))
    if out is not None:
        written = [write_json(out / "report.json", result_json(result, wall_s=wall_s))]
        written += _plots(result, out)
        _wrote(written)
    else:
        print("(--out DIR writes report.json and the plots)")


def _plots(result: SimResult, out: Path, prefix: str = "") -> list[Path]:
    from sim.plots import plot_run

    return plot_run(result, out, prefix=prefix)


def _wrote(paths: Sequence[Path]) -> None:
    print("wrote " + ", ".join(str(p) for p in paths))


def _compare(scenario: Scenario, seed: int | None, out: Path | None, progress: _Progress) -> None:
    results = compare_controllers(scenario, seed=seed, hook=progress)
    progress.close()
    top = top_tier(scenario)
    print(f"controllers on {scenario.name} (seed {results[0].seed}):")
    print(compare_table(scenario, results))
    winner = best(results, top)
    print(f"best by score: {winner.controller}")
    verdict = gate_mode_verdict(results, top)
    if verdict:
        print(verdict)
    if out is not None:
        from sim.plots import plot_compare

        report: dict[str, Any] = {
            "scenario": scenario.name,
            "best": winner.controller,
            "runs": [result_json(r) for r in results],
        }
        _wrote(
            [write_json(out / "compare.json", report), plot_compare(results, out / "compare.png")]
        )


def _sweep_backends(
    scenario: Scenario, spec: SweepSpec, seed: int | None, out: Path | None, progress: _Progress
) -> None:
    rows = sweep_backends(scenario, spec, seed=seed, hook=progress)
    progress.close()
    print(f"backend count sweep on {scenario.name}:")
    print(_backends_table(rows))
    chosen = pick_backends(rows)
    if chosen is None:
        print("no count in the sweep holds every tier's SLO and shed budget")
    else:
        print(f"smallest count that holds: {chosen.count} backends")
    if out is not None:
        from sim.plots import plot_backends

        report = {
            "scenario": scenario.name,
            "chosen": chosen.count if chosen else None,
            "rows": [
                {
                    "backends": r.count,
                    "holds": r.holds,
                    "failures": list(r.failures),
                    **_brief(r.result),
                }
                for r in rows
            ],
        }
        _wrote(
            [
                write_json(out / "sweep_backends.json", report),
                plot_backends(rows, out / "sweep_backends.png"),
            ]
        )


def _brief(r: SimResult) -> dict[str, Any]:
    report = result_json(r)
    return {"goodput_ratio": report["goodput_ratio"], "tiers": report["tiers"]}


def _backends_table(rows: Sequence[BackendRow]) -> str:
    names = [t.name for t in rows[0].result.tiers]
    headers = ["backends", "goodput%"]
    headers += [f"{n} p99/SLO s" for n in names] + [f"{n} shed%" for n in names] + ["holds"]
    body = []
    for row in rows:
        tiers = [row.result.tier(n) for n in names]
        body.append(
            [row.count, f"{100 * row.result.goodput_ratio:.1f}"]
            + [f"{t.latency_s.p99:.1f}/{t.slo_latency_s:g}" for t in tiers]
            + [f"{100 * t.shed_ratio:.1f}" for t in tiers]
            + ["yes" if row.holds else "no"]
        )
    return format_table(headers, body)


def _sweep_gains(
    scenario: Scenario,
    specs: Sequence[SweepSpec],
    seed: int | None,
    out: Path | None,
    progress: _Progress,
) -> None:
    rows = sweep_gains(scenario, specs, seed=seed, hook=progress)
    progress.close()
    top = top_tier(scenario)
    print(f"controller gain sweep on {scenario.name} ({scenario.controller.label}):")
    print(_gains_table(rows, top))
    winner = best_gains(rows)
    if winner is not None:
        print(f"best: {winner.label()} (score {winner.score:.3f})")
    if out is not None and rows:
        from sim.plots import plot_gains

        report = {
            "scenario": scenario.name,
            "best": dict(winner.values) if winner else None,
            "rows": [
                {
                    "gains": dict(r.values),
                    "score": r.score,
                    "goodput_ratio": r.result.goodput_ratio,
                    f"{top}_p99_s": r.result.tier(top).latency_s.p99,
                    "limit_oscillation": r.result.limit_oscillation(),
                }
                for r in rows
            ],
        }
        _wrote(
            [
                write_json(out / "sweep_gains.json", report),
                plot_gains(rows, out / "sweep_gains.png"),
            ]
        )


def _gains_table(rows: Sequence[GainRow], top: str) -> str:
    names = [k for k, _ in rows[0].values] if rows else []
    headers = [*names, "goodput%", f"{top} p99 s", "limit osc", "score"]
    body = [
        [
            *(f"{v:g}" for _, v in r.values),
            f"{100 * r.result.goodput_ratio:.1f}",
            f"{r.result.tier(top).latency_s.p99:.2f}",
            f"{r.result.limit_oscillation():.3f}",
            f"{r.score:.3f}",
        ]
        for r in rows
    ]
    return format_table(headers, body)
