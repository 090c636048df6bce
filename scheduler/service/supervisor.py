"""`scheduler serve --workers N`: N forked worker processes on one listening socket, supervised.

Why our own and not hypercorn's multi-process runner: that one neither replaces a dead worker
nor reports it (it stops the others and exits 0, so no supervisor above would restart it).
Here the parent binds the socket, forks the workers (each inherits the socket and accepts on
it; the kernel spreads the connections), and then only watches:

- a worker says it is serving by writing a byte on its ready pipe: "worker P serving";
- a worker that dies while serving is replaced at once (the others keep serving), unless
  `max_deaths` died within `death_window_s`: then the parent gives up;
- a worker that exits before it served means this config cannot serve (a bad URL, a port,
  Redis refusing): the parent gives up rather than fork it again and again;
- SIGHUP to the parent is passed on to every serving worker (each reloads its gains);
- SIGTERM or SIGINT to the parent: every worker gets SIGTERM and drains exactly as a single
  process does (README, "Graceful shutdown"); the parent exits 0 once they all have left;
- giving up: the workers are stopped the same way, and the parent exits 1, so that a
  supervisor above (systemd, Kubernetes) restarts the whole.

Each worker holds the read end of a pipe whose write end only the parent holds: when the
parent dies, even by SIGKILL, the pipe reads end-of-file and the worker shuts down.

The parent is a plain loop over `select` (no trio in it: it forks, and forking a running
event loop is asking for trouble); signals reach it through `signal.set_wakeup_fd`.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

WorkerMain = Callable[["WorkerPipes"], int]


class DrainFlag:
    """Whether the operator drained this process (`POST /admin/v1/drain`): one byte of memory
    that the parent and every worker it forks share, so every worker agrees at once, and a
    worker started later (a replacement) starts drained."""

    def __init__(self) -> None:
        self._memory = mmap.mmap(-1, 1)  # anonymous and shared: forked children see writes

    def is_set(self) -> bool:
        return self._memory[0] == 1

    def set(self) -> None:
        self._memory[0] = 1

    def clear(self) -> None:
        self._memory[0] = 0


@dataclass(frozen=True, slots=True)
class WorkerPipes:
    """What a worker gets from its parent."""

    ready_fd: int  # write a byte here once serving
    parent_fd: int  # reads end-of-file once the parent is gone

    def serving(self) -> None:
        os.write(self.ready_fd, b"1")
        os.close(self.ready_fd)


@dataclass(slots=True)
class _Worker:
    pid: int
    ready_fd: int  # the parent's read end
    serving: bool = False


def _say(message: str) -> None:
    print(f"scheduler: {message}", file=sys.stderr, flush=True)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    """Runs `main` in `workers` forked processes until a signal, replacing those that die."""

    def __init__(
        self,
        workers: int,
        main: WorkerMain,
        *,
        stop_timeout_s: float = 30.0,
        max_deaths: int | None = None,
        death_window_s: float = 60.0,
        on_death: Callable[[int], None] = lambda pid: None,
    ) -> None:
        self._count = workers
        self._main = main
        self._stop_timeout_s = stop_timeout_s
        self._max_deaths = 2 * workers if max_deaths is None else max_deaths
        self._death_window_s = death_window_s
        self._on_death = on_death  # e.g. drop its live metrics from the merge
        self._workers: dict[int, _Worker] = {}
        self._deaths: deque[float] = deque()
        self._parent_r, self._parent_w = os.pipe()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (then 0) or until the workers cannot be kept (then 1)."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        previous = {s: signal.signal(s, lambda *_: None) for s in _SIGNALS}
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            for _ in range(self._count):
                self._start()
            code = self._watch(wake_r)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in previous.items():
                signal.signal(s, handler)
            for fd in (wake_r, wake_w, self._parent_r, self._parent_w):
                os.close(fd)
        return code

    def _watch(self, wake_r: int) -> int:
        code: int | None = None  # set once stopping
        stop_by = float("inf")
        while self._workers or code is None:
            if code is not None and time.monotonic() >= stop_by:
                for pid in self._workers:
                    _say(f"worker {pid} still running {self._stop_timeout_s:g} s after SIGTERM")
                    os.kill(pid, signal.SIGKILL)
                stop_by = float("inf")
            waiting = [w.ready_fd for w in self._workers.values() if not w.serving]
            timeout_s = min(1.0, max(0.0, stop_by - time.monotonic()))
            readable, _, _ = select.select([wake_r, *waiting], [], [], timeout_s)
            for fd in readable:
                if fd != wake_r:
                    self._note_ready(fd)
            if wake_r in readable:
                signals = set(os.read(wake_r, 64))
                if signals & {signal.SIGTERM, signal.SIGINT} and code is None:
                    code, stop_by = 0, self._stop_all()
                if signal.SIGHUP in signals and code is None:
                    for worker in self._workers.values():
                        if worker.serving:
                            os.kill(worker.pid, signal.SIGHUP)
            give_up = self._reap(stopping=code is not None)
            if give_up is not None and code is None:
                _say(f"giving up: {give_up}")
                code, stop_by = 1, self._stop_all()
        return code

    def _start(self) -> None:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(ready_r)
                os.close(self._parent_w)
                for other in self._workers.values():
                    os.close(other.ready_fd)
                signal.set_wakeup_fd(-1)
                for s in _SIGNALS:
                    signal.signal(s, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # unless the replica listens
                code = self._main(WorkerPipes(ready_w, self._parent_r))
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(ready_w)
        self._workers[pid] = _Worker(pid, ready_r)

    def _note_ready(self, fd: int) -> None:
        worker = next(w for w in self._workers.values() if w.ready_fd == fd)
        if os.read(fd, 1):
            worker.serving = True
            _say(f"worker {worker.pid} serving")
        # end-of-file without the byte: the worker died; `_reap` tells

    def _reap(self, *, stopping: bool) -> str | None:
        """Collect the workers that exited; replace them, or say why not (give up)."""
        reason = None
        for pid in list(self._workers):  # only ours: the embedded Redis is a child too
            exited, status = os.waitpid(pid, os.WNOHANG)
            if not exited:
                continue
            worker = self._workers.pop(pid)
            os.close(worker.ready_fd)
            self._on_death(pid)
            how = _describe(status)
            if stopping:
                if status != 0:
                    _say(f"worker {pid} {how}")
                continue
            if not worker.serving:
                reason = f"worker {pid} {how} before serving"
                _say(reason)
                continue
            now = time.monotonic()
            self._deaths.append(now)
            while self._deaths and self._deaths[0] < now - self._death_window_s:
                self._deaths.popleft()
            if len(self._deaths) > self._max_deaths:
                reason = f"{len(self._deaths)} workers died within {self._death_window_s:g} s"
                _say(f"worker {pid} {how}")
                continue
            _say(f"worker {pid} {how}: starting a replacement")
            self._start()
        return reason

    def _stop_all(self) -> float:
        """SIGTERM every worker; returns when to stop waiting for them."""
        for pid in self._workers:
            os.kill(pid, signal.SIGTERM)
        return time.monotonic() + self._stop_timeout_s


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP)
