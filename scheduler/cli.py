"""The `scheduler` command: `serve` the gateway, run the `demo-backend`, or `sim` a scenario."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scheduler", description="Tiered admission scheduler for AI inference."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the OpenAI-compatible gateway")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        print("scheduler serve: the gateway is not built yet (see the issues)", file=sys.stderr)
        return 2
    return 0
