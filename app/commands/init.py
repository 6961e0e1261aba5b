"""`rmamba init`: write a commented example plant.toml to start from."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.config import EXAMPLE_PLANT_TOML, load_plant_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a commented example plant.toml",
                       description="Write a commented example plant.toml (see docs/plant_config.md).")
    p.add_argument("--out", type=Path, default=Path("plant.toml"), help="file to write (default: plant.toml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(EXAMPLE_PLANT_TOML, encoding="utf-8")
    cfg = load_plant_config(out)  # the example must always load: fail loudly here, not at the first ingest
    print(f"wrote {out} (plant {cfg.name!r}, {len(cfg.sources)} sources); edit it, then: "
          f"rmamba ingest --config {out}")
    return 0
