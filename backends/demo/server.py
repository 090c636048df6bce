"""The demo GPU server: an OpenAI-compatible HTTP server that behaves like vLLM.

A `GpuModel` (continuous batching, KV-cache admission, a bounded waiting room) is driven in
real time by one trio task, so latency grows with concurrency and a full server answers 503,
as a real one does. It serves the gateway as its built-in default backend, tests and
benchmarks, and runs alone with `python -m backends.demo.server --port 8001`.

    DemoConfig              what to serve (GPU rules, model names, output length, seed)
    create_demo_app()       the ASGI app (backends.demo.app)
    serve_demo_backend()    serve it with hypercorn's trio worker until cancelled
    main()                  the command line

HTTP surface: POST /v1/chat/completions, /v1/completions (both with SSE streaming),
/v1/embeddings; GET /v1/models, /metrics (vLLM's metric names), /health; and for tests
GET/POST /demo/config (live GPU settings) and GET /demo/traceparents (the last 100 received).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from backends.demo.app import DemoApp, DemoConfig, create_demo_app
from scheduler.models.gpu import GpuConfig

__all__ = ["DemoApp", "DemoConfig", "create_demo_app", "main", "serve_demo_backend"]


def hypercorn_config(host: str, port: int) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.loglevel = "WARNING"  # no "Running on ..." line for every server a test starts
    config.keep_alive_max_requests = 1_000_000_000  # like vLLM: keep-alive is not rationed
    config.graceful_timeout = 1.0
    config.backlog = 1024  # benchmarks open hundreds of connections at once
    return config


async def serve_demo_backend(
    config: DemoConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the demo app until cancelled; reports the bound port (port 0 picks a free one)
    through `task_status`, so `port = await nursery.start(serve_demo_backend, config)`."""
    app = create_demo_app(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(app.engine.run)  # here, not in the lifespan: its failures propagate
        binds: list[str] = await nursery.start(serve, app, hypercorn_config(host, port))
        task_status.started(int(binds[0].rsplit(":", 1)[1]))


_GPU_HELP = {
    "max_batch": "sequences decoded together",
    "kv_capacity_tokens": "KV-cache size in tokens (prompt plus output of running requests)",
    "max_waiting": "waiting room size; beyond it requests get 503",
    "decode_base_s": "seconds per decode step, fixed part",
    "decode_per_seq_s": "seconds per decode step added by each running sequence",
    "prefill_tokens_per_step": "prompt tokens prefilled per step",
    "prefill_s_per_token": "seconds each prompt token adds to the step that prefills it",
    "decode_per_kv_token_s": "seconds per decode step added by each token of context",
    "prefill_join_s": "seconds a prompt adds per sequence decoding when it joins the batch",
    "decode_alone_s": "seconds per decode step of a lone sequence (0: base plus per-seq)",
}


def build_parser(prog: str = "python -m backends.demo.server") -> argparse.ArgumentParser:
    """The command line; `prog` is how it was called (`scheduler demo-backend` passes its own)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A demo OpenAI-compatible GPU server that behaves like vLLM.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="listen port (default 8001)")
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help=f"a model name to serve (repeatable; default {DemoConfig.model_names[0]})",
    )
    default_tokens = DemoConfig.default_output_tokens
    parser.add_argument(
        "--default-output-tokens",
        type=int,
        default=default_tokens,
        metavar="N",
        help=f"tokens generated when a request sets no max_tokens (default {default_tokens})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the generated text and ids, so that runs repeat (default 0)",
    )
    for field in dataclasses.fields(GpuConfig):
        default = getattr(GpuConfig(), field.name)
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=type(default),
            metavar="S" if field.name.endswith("_s") else "N",
            default=default,
            help=f"{_GPU_HELP.get(field.name, '')} (default {default})",
        )
    return parser


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    gpu = GpuConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GpuConfig)})
    return DemoConfig(
        gpu=gpu,
        model_names=tuple(args.models or DemoConfig.model_names),
        default_output_tokens=args.default_output_tokens,
        seed=args.seed,
    )


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Serve in the foreground until Ctrl-C or SIGTERM; 1 if the port cannot be bound."""
    parser = build_parser(prog) if prog else build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.WARNING)
    status = 0
    try:
        trio.run(_serve_until_signal, config, args.host, args.port)
    except* OSError as group:
        print(f"demo GPU server: {_first_leaf(group)}", file=sys.stderr)
        status = 1
    return status


async def _serve_until_signal(config: DemoConfig, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(serve_demo_backend, config, host=host, port=port))
            shown = f"[{host}]" if ":" in host else host
            print(f"demo GPU server on http://{shown}:{bound}/v1", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


if __name__ == "__main__":
    sys.exit(main())
