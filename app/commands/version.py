"""`rmamba version`: print the package and key library versions."""

from __future__ import annotations

import argparse
import platform
from importlib import metadata


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("version", help="print versions of rmamba and its key libraries",
                       description="Print versions of rmamba, Python, torch and triton.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(f"rmamba {metadata.version('rmamba')}  (Python {platform.python_version()})")
    for dist in ("torch", "triton", "polars", "mlflow"):
        try:
            print(f"  {dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            print(f"  {dist} not installed")
    return 0
