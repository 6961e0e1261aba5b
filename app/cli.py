"""The `rmamba` console entry point.

Each subcommand lives in its own module under app/commands/ and exposes
``register(subparsers) -> None``, which adds a parser whose ``func`` default takes the parsed
arguments and returns an exit code. Modules are discovered, so adding a command touches one file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from app import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmamba",
        description="Industrial time-series anomaly detection on a Routing-Mamba sequence model.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"app.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, PermissionError, KeyError) as exc:
        # Input errors carry a message naming file/row/column/argument: show it without a traceback,
        # unless RMAMBA_DEBUG=1 asks for one.
        if os.environ.get("RMAMBA_DEBUG") == "1":
            raise
        print(f"rmamba {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
