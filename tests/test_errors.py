"""The one exception root: every project exception descends from it and is drawn in its tree."""

from __future__ import annotations

import ast
from pathlib import Path

import scheduler.errors

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("policies", "scheduler", "backends", "sim", "bench")


def exception_classes() -> dict[str, list[str]]:
    """Each public class under PARTS that subclasses an exception, with its bases' names."""
    classes: dict[str, list[str]] = {}
    for part in PARTS:
        for path in sorted((ROOT / part).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                    classes[node.name] = [ast.unparse(b).split(".")[-1] for b in node.bases]
    errors: dict[str, list[str]] = {}
    known = {"Exception", "ValueError", "RuntimeError", "OSError", "SchedulerError"}
    while True:
        found = {
            name: bases
            for name, bases in classes.items()
            if name not in errors and any(b in known or b in errors for b in bases)
        }
        if not found:
            return errors
        errors.update(found)


def test_every_project_exception_descends_from_the_root_and_is_in_its_tree() -> None:
    errors = exception_classes()
    assert {"ConfigError", "BackendTimeout", "RedisUnavailable", "ScenarioError"} <= set(errors)
    tree = scheduler.errors.__doc__ or ""
    rootless: list[str] = []
    for name in errors:
        chain, seen = name, set()
        while chain in errors and chain != "SchedulerError" and chain not in seen:
            seen.add(chain)
            chain = next((b for b in errors[chain] if b in errors), errors[chain][0])
        if chain != "SchedulerError" and name != "SchedulerError":
            rootless.append(name)
    assert rootless == []
    assert [name for name in errors if name != "SchedulerError" and name not in tree] == []
