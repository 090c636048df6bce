"""llama.cpp's `llama-server` for benches: build it, write its random-weight model, run it.

    python bench/llama_server.py build              # once per version and options, then cached
    python bench/llama_server.py model [--layers N --embedding N ...]   # prints the GGUF path
    python bench/llama_server.py run --port 8081 --parallel 4 --ctx-size 8192

`run` builds and writes what is missing, serves on 127.0.0.1 until Ctrl-C and prints the URL.
The work is done by tests/support/llama_server.py (the test suite's fixture), so benches and
tests run the very same engine and model.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

from tests.support.llama_server import (  # noqa: E402
    LlamaServer,
    ModelShape,
    ServerOptions,
    ensure_llama_server,
    ensure_model,
)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _shape(args: argparse.Namespace) -> ModelShape:
    return ModelShape(
        embedding=args.embedding,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        feed_forward=args.feed_forward,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build llama-server (cached per version)")
    for name in ("model", "run"):
        sub = commands.add_parser(name)
        default = ModelShape()
        sub.add_argument("--embedding", type=int, default=default.embedding)
        sub.add_argument("--layers", type=int, default=default.layers)
        sub.add_argument("--heads", type=int, default=default.heads)
        sub.add_argument("--kv-heads", type=int, default=default.kv_heads)
        sub.add_argument("--feed-forward", type=int, default=default.feed_forward)
    run = commands.choices["run"]
    run.add_argument("--port", type=int, default=8081)
    run.add_argument("--parallel", type=int, default=2, help="slots (continuous batching)")
    run.add_argument("--ctx-size", type=int, default=8192, help="KV cache, shared by the slots")
    run.add_argument("--threads", type=int, default=2)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started_at = time.monotonic()
    build = ensure_llama_server(log=_log)
    _log(f"llama-server {build.version}: {build.binary} ({time.monotonic() - started_at:.1f} s)")
    if args.command == "build":
        return 0
    model = ensure_model(build, _shape(args))
    if args.command == "model":
        print(model)
        return 0
    options = ServerOptions(parallel=args.parallel, ctx_size=args.ctx_size, threads=args.threads)
    with LlamaServer(build, model, options, port=args.port) as server:
        print(server.url, flush=True)
        # blocked only now: the server, already started, must not inherit the mask
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    sys.exit(main())
