"""A one-line progress bar on stderr, redrawn in place, for long runs and sweeps."""

from __future__ import annotations

from typing import TextIO


class ProgressBar:
    """Call with the fraction done (0..1); redraws only when a whole percent has passed."""

    def __init__(self, stream: TextIO, label: str, *, width: int = 30) -> None:
        self._stream = stream
        self._label = label
        self._width = width
        self._shown = -1

    def __call__(self, fraction: float) -> None:
        percent = max(0, min(100, int(fraction * 100)))
        if percent == self._shown:
            return
        self._shown = percent
        filled = percent * self._width // 100
        bar = "#" * filled + "." * (self._width - filled)
        self._stream.write(f"\r[{bar}] {percent:3d}% {self._label}")
        self._stream.flush()

    def close(self) -> None:
        if self._shown >= 0:
            self._stream.write("\n")
            self._stream.flush()
        self._shown = -1
