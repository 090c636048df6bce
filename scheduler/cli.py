"""The `scheduler` command: `serve` the gateway, run the `demo-backend`, `sim` a scenario, or
`calibrate` the simulator against a backend."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scheduler", description="Tiered admission scheduler for AI inference."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the OpenAI-compatible gateway")
    serve.add_argument("--config", help="TOML config file (default: the built-in demo)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080)")
    serve.add_argument("--workers", type=int, help="worker processes, each a replica (default 1)")
    serve.add_argument("--redis-url", help="Redis URL (default: an embedded redis-server)")
    commands.add_parser("demo-backend", help="run the demo GPU server alone", add_help=False)
    commands.add_parser("sim", help="simulate a scenario", add_help=False)
    commands.add_parser(
        "calibrate", help="fit the simulator's backend model to a backend", add_help=False
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo-backend"]:
        from backends.demo.server import main as demo_main

        return demo_main(argv[1:], prog="scheduler demo-backend")
    if argv[:1] == ["sim"]:
        from sim.cli import main as sim_main

        return sim_main(argv[1:], prog="scheduler sim")
    if argv[:1] == ["calibrate"]:
        from scheduler.calibrate import main as calibrate_main

        return calibrate_main(argv[1:], prog="scheduler calibrate")
    args = build_parser().parse_args(argv)
    from scheduler.service.config import ConfigError
    from scheduler.service.serve import ListenError, run

    overrides = {"host": args.host, "port": args.port, "workers": args.workers}
    if args.redis_url:
        import os

        os.environ["SCHEDULER_REDIS_URL"] = args.redis_url
    try:
        return run(args.config, {k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        print(f"scheduler: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except ListenError as exc:
        print(f"scheduler: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
