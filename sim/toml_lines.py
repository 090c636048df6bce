"""Where each field of a TOML file is written, so a validation error can name the line.

Why: `tomllib` gives a line only for syntax errors; a value that parses but is wrong (a
negative weight) must still point the author at the line. This is a best-effort reader of the
layout only: table headers (`[a.b]`, `[[a]]`, arrays of tables index as `a[0]`) and `key =`
lines; a field it cannot place is reported with the line of its nearest enclosing table.
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(
    r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*="
)


def _split_key(raw: str) -> list[str]:
    return [part.strip().strip("\"'") for part in re.split(r"\s*\.\s*", raw.strip())]


class FieldLines:
    """Maps field paths such as `tiers[1].quota.limit` to 1-based line numbers."""

    def __init__(self, text: str) -> None:
        self._lines: dict[str, int] = {}
        arrays: dict[str, int] = {}  # path of an array of tables -> its last index
        table = ""
        for number, line in enumerate(text.splitlines(), start=1):
            header = _HEADER.match(line)
            if header:
                is_array = header.group(1) == "[["
                table = self._resolve(_split_key(header.group(2)), arrays, is_array)
                self._lines.setdefault(table, number)
                continue
            key = _KEY.match(line)
            if key:
                path = ".".join(filter(None, [table, *_split_key(key.group(1))]))
                self._lines.setdefault(path, number)

    def _resolve(self, parts: list[str], arrays: dict[str, int], is_array: bool) -> str:
        path = ""
        for i, part in enumerate(parts):
            path = f"{path}.{part}" if path else part
            last = i == len(parts) - 1
            if last and is_array:
                arrays[path] = arrays.get(path, -1) + 1
                return f"{path}[{arrays[path]}]"
            if path in arrays:
                path = f"{path}[{arrays[path]}]"
        return path

    def line_of(self, path: str) -> int | None:
        """The line of `path`, else of its nearest enclosing table, else None."""
        while path:
            if path in self._lines:
                return self._lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return None
