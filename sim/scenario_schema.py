"""Typed reading of one parsed TOML table, with errors that name the field and its line.

Why a small reader of our own: every scenario field is read once, through one of these
getters, so every mistake (a missing field, a wrong type, a value out of range, an unknown
field from a typo) ends in the same `ScenarioError` naming `tiers[1].quota.limit` and the
line it is on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NoReturn

from scheduler.errors import SchedulerError
from sim.toml_lines import FieldLines


class ScenarioError(SchedulerError, ValueError):
    """A scenario that cannot run: `field` is its dotted path, `line` its line (if known)."""

    def __init__(self, field: str, message: str, *, source: str, line: int | None) -> None:
        self.field = field
        self.message = message
        self.source = source
        self.line = line
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {field}: {message}")


class Context:
    """What every table reader shares: the file's name, its lines and its folder."""

    def __init__(self, source: str, lines: FieldLines, base_dir: Path) -> None:
        self.source = source
        self.lines = lines
        self.base_dir = base_dir

    def error(self, field: str, message: str) -> NoReturn:
        raise ScenarioError(field, message, source=self.source, line=self.lines.line_of(field))


_MISSING: Any = object()


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Table:
    """One TOML table at `path`; `done()` refuses the fields nobody read."""

    def __init__(self, data: dict[str, Any], path: str, ctx: Context) -> None:
        self.data = data
        self.path = path
        self.ctx = ctx
        self._read: set[str] = set()

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> NoReturn:
        self.ctx.error(self.field(key), message)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self._read.add(key)
        if key not in self.data:
            if default is _MISSING:
                self.error(key, "is required")
            return default
        return self.data[key]

    def number(
        self,
        key: str,
        default: float = _MISSING,
        *,
        gt: float | None = None,
        ge: float | None = None,
        le: float | None = None,
        lt: float | None = None,
        finite: bool = True,
    ) -> float:
        value = self.raw(key, default)
        if not _is_number(value):
            self.error(key, f"must be a number, got {value!r}")
        number = float(value)
        if math.isnan(number) or (finite and math.isinf(number)):
            self.error(key, f"must be a finite number, got {value!r}")
        for bound, ok, rule in (
            (gt, gt is not None and number > gt, "> {}"),
            (ge, ge is not None and number >= ge, ">= {}"),
            (le, le is not None and number <= le, "<= {}"),
            (lt, lt is not None and number < lt, "< {}"),
        ):
            if bound is not None and not ok:
                self.error(key, f"must be {rule.format(_fmt(bound))}, got {value!r}")
        return number

    def integer(self, key: str, default: int = _MISSING, *, ge: int | None = None) -> int:
        value = self.raw(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            self.error(key, f"must be an integer, got {value!r}")
        if ge is not None and value < ge:
            self.error(key, f"must be >= {ge}, got {value!r}")
        return value

    def text(self, key: str, default: str = _MISSING, *, choices: tuple[str, ...] = ()) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            self.error(key, f"must be a string, got {value!r}")
        if choices and value not in choices:
            self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def flag(self, key: str, default: bool = _MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            self.error(key, f"must be true or false, got {value!r}")
        return value

    def names(self, key: str, default: tuple[str, ...] = _MISSING) -> tuple[str, ...]:
        value = self.raw(key, default)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            self.error(key, f"must be a list of strings, got {value!r}")
        return tuple(value)

    def table(self, key: str) -> Table | None:
        value = self.raw(key, None)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.error(key, f"must be a table, got {value!r}")
        return Table(value, self.field(key), self.ctx)

    def tables(self, key: str) -> list[Table]:
        """An array of tables (`[[key]]`); empty when absent."""
        value = self.raw(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.error(key, "must be an array of tables ([[...]])")
        return [Table(v, f"{self.field(key)}[{i}]", self.ctx) for i, v in enumerate(value)]

    def done(self) -> None:
        """Refuse any field that was not read: most often a typo."""
        for key in self.data:
            if key not in self._read:
                self.error(key, "unknown field")


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)
