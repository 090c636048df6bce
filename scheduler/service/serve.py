"""Serving: one replica in this process, or N worker processes, plus the demo's children.

`serve_replica(settings, ...)` is the programmatic entry point (tests and the single-process
CLI use it). `run(settings)` is what `scheduler serve` does: it starts what the config asks
for and nobody else provides (the embedded Redis, the demo backend) once, in the parent,
then serves with one process or with hypercorn's N workers, each a replica of its own that
rebuilds its settings from `SCHEDULER_REPLICA` in its environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio

from scheduler.service.app import create_app
from scheduler.service.config import DEMO_BACKEND, DEMO_KEYS, Settings, load_settings
from scheduler.service.metrics import multiprocess_dir
from scheduler.service.redis_embedded import EmbeddedRedis, free_port
from scheduler.service.replica import Replica

REPLICA_ENV = "SCHEDULER_REPLICA"


def with_demo_url(settings: Settings, demo_url: str) -> Settings:
    """Replace the `demo` placeholder in every model's backend list with the real URL."""
    models = tuple(
        dataclasses.replace(
            m, backends=tuple(demo_url if b == DEMO_BACKEND else b for b in m.backends)
        )
        for m in settings.models
    )
    return dataclasses.replace(settings, models=models)


def hypercorn_config(settings: Settings) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"{settings.server.host}:{settings.server.port}"]
    config.worker_class = "trio"
    config.accesslog = None
    config.graceful_timeout = settings.server.drain_timeout_s
    config.keep_alive_timeout = 75
    return config


def build_app(settings: Settings) -> QuartTrio:
    if settings.uses_demo_backend:
        raise ValueError("the demo backend's URL must be resolved before building the app")
    return create_app(Replica(settings))


async def serve_replica(
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one replica until `shutdown_trigger` returns (or forever); reports the port.

    After the trigger the replica drains first: `/readyz` turns false, new requests get 503
    with `Retry-After`, and requests in flight (streams included) finish, up to
    `server.drain_timeout_s`; only then does hypercorn close the connections."""
    if settings.uses_demo_backend:
        raise ValueError("the demo backend's URL must be resolved before serving")
    replica = Replica(settings)
    app = create_app(replica)
    config = hypercorn_config(settings)
    # the replica drains in-flight work itself; hypercorn's own grace period would otherwise
    # wait out idle keep-alive connections, which have nothing left to finish
    config.graceful_timeout = 1.0
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


def app_from_env() -> QuartTrio:
    """The app of one of hypercorn's worker processes (see `run`)."""
    args = json.loads(os.environ[REPLICA_ENV])
    settings = load_settings(args["config"], overrides=args["server"])
    settings = dataclasses.replace(settings, redis_url=args["redis_url"])
    return build_app(with_demo_url(settings, args["demo_url"]) if args["demo_url"] else settings)


@contextmanager
def demo_backend(settings: Settings) -> Iterator[str]:
    """Run the built-in demo backend as a child process; yields its URL."""
    port = free_port()
    args = [sys.executable, "-m", "backends.demo", "--host", "127.0.0.1", "--port", str(port)]
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


def run(config_path: str | None, overrides: dict[str, Any]) -> int:
    """`scheduler serve`: start the children the config needs, then serve until a signal."""
    settings = load_settings(config_path, overrides=overrides)
    with ExitStack() as stack:
        redis_url = settings.redis_url
        if not redis_url:
            redis_url = stack.enter_context(EmbeddedRedis()).url
            print(f"embedded Redis at {redis_url}", flush=True)
        settings = dataclasses.replace(settings, redis_url=redis_url)
        demo_url = ""
        if settings.uses_demo_backend:
            demo_url = stack.enter_context(demo_backend(settings))
            settings = with_demo_url(settings, demo_url)
            print(f"demo backend at {demo_url}", flush=True)
        if not os.environ.get("SCHEDULER_KEY_SECRET"):
            print("SCHEDULER_KEY_SECRET is not set: using the development secret", flush=True)
        if config_path is None:
            print("demo keys: " + ", ".join(DEMO_KEYS), flush=True)
        server = settings.server
        print(
            f"serving on http://{server.host}:{server.port} with {server.workers} worker(s)",
            flush=True,
        )
        if server.workers == 1:
            trio.run(lambda: serve_replica(settings, shutdown_trigger=_until_signalled))
            return 0
        from hypercorn.run import run as hypercorn_run

        stack.enter_context(multiprocess_dir())  # one scrape of /metrics sees every worker
        os.environ[REPLICA_ENV] = json.dumps(
            {
                "config": config_path,
                "server": overrides,
                "redis_url": redis_url,
                "demo_url": demo_url,
            }
        )
        config = hypercorn_config(settings)
        config.workers = server.workers
        config.application_path = "scheduler.service.serve:app_from_env()"
        return hypercorn_run(config)
