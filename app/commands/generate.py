"""`rmamba generate`: write the embedded synthetic plant (logs, labels, plant.toml) to a folder."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime


def _date(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD (UTC), got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="write the synthetic demo plant (raw logs, labels.csv, plant.toml) to a folder",
        description="Simulate a plant of pumps, compressors and conveyors at one-minute resolution with "
        "labelled anomalies, and write it as wide CSV and historian logs plus a plant.toml ready for "
        "`rmamba ingest --config DIR/plant.toml`. Same arguments give byte-identical files.",
    )
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--days", type=float, default=30.0, help="length of the time range in days (default 30)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiplies the units of every type (default 1: 3 pumps, 2 compressors, 2 conveyors); "
                   "about 40 MB of logs per month at scale 1, so --scale 75 gives about 3 GB")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--start", type=_date, default=None, help="first day, YYYY-MM-DD in UTC (default 2026-03-02)")
    p.add_argument("--clean-fraction", type=float, default=0.4,
                   help="leading share of the range kept anomaly-free for training (default 0.4)")
    p.add_argument("--force", action="store_true",
                   help="replace a plant generated earlier in --out (only the files generate writes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.generate import DEFAULT_START, generate_plant

    t0 = time.perf_counter()
    try:
        plant = generate_plant(
            args.out,
            days=args.days,
            scale=args.scale,
            seed=args.seed,
            start=args.start or DEFAULT_START,
            clean_fraction=args.clean_fraction,
            overwrite=args.force,
            progress=sys.stderr.isatty(),
        )
    except FileExistsError as exc:
        print(f"rmamba generate: error: {str(exc).split(';')[0]}; use --force to replace it", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    logs = sum(plant.rows.values())
    print(f"wrote {plant.out_dir}: {len(plant.rows)} log files, {logs} rows, {plant.total_bytes / 1e6:.1f} MB, "
          f"{plant.labels.height} labelled anomalies in {seconds:.1f} s")
    print(f"next: rmamba ingest --config {plant.config_path}")
    return 0
