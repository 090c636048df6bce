"""Serving: one replica in this process, or N supervised worker processes, plus the demo's
children.

`serve_replica(settings, ...)` is the programmatic entry point (tests use it). `run(...)` is
what `scheduler serve` does: it binds the listening socket first (a port in use or a bad host
is one line, before anything says "serving"), starts what the config asks for and nobody else
provides (the embedded Redis, the demo backend) once, then serves in this process or in
`server.workers` processes forked by the `Supervisor`, each a replica of its own accepting on
the same socket.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client import multiprocess

from backends.redis.embedded import EmbeddedRedis, free_port
from scheduler.errors import SchedulerError
from scheduler.service.app import create_app
from scheduler.service.config import (
    DEMO_BACKEND,
    DEMO_KEYS,
    Settings,
    load_settings,
    startup_lines,
)
from scheduler.service.metrics import multiprocess_dir
from scheduler.service.replica import Replica
from scheduler.service.supervisor import DrainFlag, Supervisor, WorkerMain, WorkerPipes

# connections waiting to be accepted: 2,000 clients connecting at once (LLM-shaped load, a
# fleet restarting) overflowed 1,024 and some were refused; Linux caps it at somaxconn (4096)
BACKLOG = 4096


class ListenError(SchedulerError):
    """The listening socket cannot be had (port in use, unknown host): said in one line."""


def with_demo_url(settings: Settings, demo_url: str) -> Settings:
    """Replace the `demo` placeholder in every model's backend list with the real URL."""
    models = tuple(
        dataclasses.replace(
            m, backends=tuple(demo_url if b == DEMO_BACKEND else b for b in m.backends)
        )
        for m in settings.models
    )
    return dataclasses.replace(settings, models=models)


def hypercorn_config(settings: Settings, listen_fd: int | None = None) -> HypercornConfig:
    """Listening on `listen_fd` (a socket bound by `listen`, which hypercorn then owns) or,
    without one, binding `server.host:server.port` itself."""
    config = HypercornConfig()
    server = settings.server
    config.bind = [f"fd://{listen_fd}" if listen_fd is not None else f"{server.host}:{server.port}"]
    config.backlog = BACKLOG
    config.worker_class = "trio"
    config.accesslog = None
    # the replica drains in-flight work itself; hypercorn's own grace period would otherwise
    # wait out idle keep-alive connections, which have nothing left to finish
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 75
    return config


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as exc:  # socket.gaierror (an unknown host) is one too
        # create_server appends the address to the reason; the line names it already
        gai = isinstance(exc, socket.gaierror)
        reason = (exc.strerror if gai or not exc.errno else os.strerror(exc.errno)) or str(exc)
        reason = reason.lower()
        raise ListenError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


async def serve_replica(
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    listen_fd: int | None = None,
    drain_flag: DrainFlag | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one replica until `shutdown_trigger` returns (or forever); reports the port.

    After the trigger the replica drains first: `/readyz` turns false, new requests get 503
    with `Retry-After`, and requests in flight (streams included) finish, up to
    `server.drain_timeout_s`; only then does hypercorn close the connections. `listen_fd` and
    `drain_flag` are given by `run`: the socket every worker accepts on, and the operator's
    drain that every worker shares."""
    if settings.uses_demo_backend:
        raise ValueError("the demo backend's URL must be resolved before serving")
    replica = Replica(settings, drain_flag=drain_flag or DrainFlag())
    app = create_app(replica)
    config = hypercorn_config(settings, listen_fd)
    drained_trigger: Callable[[], Awaitable[None]] | None = None
    if shutdown_trigger is not None:
        trigger = shutdown_trigger

        async def drained_trigger() -> None:
            await trigger()
            await replica.drain_and_wait(settings.server.drain_timeout_s)

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            lambda task_status: hypercorn_serve(
                app, config, shutdown_trigger=drained_trigger, task_status=task_status
            )
        )
        task_status.started(int(binds[0].rsplit(":", 1)[1]))


@contextmanager
def demo_backend(settings: Settings) -> Iterator[str]:
    """Run the built-in demo backend as a child process; yields its URL."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "backends.demo.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    for name, value in dataclasses.asdict(settings.demo).items():
        args += ["--" + name.replace("_", "-"), str(value)]
    for model in settings.models:
        if DEMO_BACKEND in model.backends:
            args += ["--model", model.name]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"child exited with status {process.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port} after {timeout_s} s") from None
            time.sleep(0.05)


async def _until_signalled() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


async def _until_stopped(parent_fd: int | None) -> None:
    """Until SIGTERM or SIGINT, or, in a worker, until its parent is gone."""
    async with trio.open_nursery() as nursery:

        async def stop_after(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_after, _until_signalled)
        if parent_fd is not None:
            nursery.start_soon(stop_after, partial(trio.lowlevel.wait_readable, parent_fd))


def _serve_here(
    settings: Settings, sock: socket.socket, drain_flag: DrainFlag, pipes: WorkerPipes | None
) -> int:
    """Serve in this process until stopped; tells `pipes` (a worker's) once serving."""

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_replica,
                    settings,
                    shutdown_trigger=partial(
                        _until_stopped, None if pipes is None else pipes.parent_fd
                    ),
                    listen_fd=os.dup(sock.fileno()),  # hypercorn closes its own
                    drain_flag=drain_flag,
                )
            )
            if pipes is not None:
                pipes.serving()

    trio.run(serve)
    return 0


def _log_to_stderr() -> None:
    """The service's own state changes (a backend out or back, Redis lost or back) on stderr,
    INFO and up; hypercorn logs through its own handler."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("scheduler")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def run(config_path: str | None, overrides: dict[str, Any]) -> int:
    """`scheduler serve`: bind, start the children the config needs, then serve until a
    signal (the workers supervised when there are several)."""
    settings = load_settings(config_path, overrides=overrides)
    server = settings.server
    _log_to_stderr()
    with ExitStack() as stack:
        sock = stack.enter_context(listen(server.host, server.port))
        redis_url = settings.redis_url
        if not redis_url:
            redis_url = stack.enter_context(EmbeddedRedis()).url
            print(f"embedded Redis at {redis_url}", flush=True)
        settings = dataclasses.replace(settings, redis_url=redis_url)
        if settings.uses_demo_backend:
            demo_url = stack.enter_context(demo_backend(settings))
            settings = with_demo_url(settings, demo_url)
            print(f"demo backend at {demo_url}", flush=True)
        if not os.environ.get("SCHEDULER_KEY_SECRET"):
            print("SCHEDULER_KEY_SECRET is not set: using the development secret", flush=True)
        if config_path is None:
            print("demo keys: " + ", ".join(DEMO_KEYS), flush=True)
        for line in startup_lines(settings):
            print(line, flush=True)
        print(
            f"serving on http://{server.host}:{server.port} with {server.workers} worker(s)",
            flush=True,
        )
        drain_flag = DrainFlag()
        if server.workers == 1:
            return _serve_here(settings, sock, drain_flag, None)
        stack.enter_context(multiprocess_dir())  # one scrape of /metrics sees every worker
        worker: WorkerMain = partial(_serve_here, settings, sock, drain_flag)
        supervisor = Supervisor(
            server.workers,
            worker,
            stop_timeout_s=server.drain_timeout_s + 10,
            on_death=multiprocess.mark_process_dead,
        )
        return supervisor.run()
