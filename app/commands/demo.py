"""`rmamba demo`: the main job end to end on the embedded synthetic plant.

generate (once) -> ingest -> train (register as challenger, promotion gate) -> score -> alert summary, each
step through the same CLI commands a user runs, so the demo exercises exactly what ships. Re-running it is
safe: ingest is incremental, training registers a new challenger, and scoring is idempotent.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the main job end to end on the embedded synthetic plant",
        description="Generate the synthetic plant (unless DIR already holds one), then ingest, train, register, "
                    "promote and score it through the regular commands, and print where the alerts are.")
    p.add_argument("--dir", type=Path, default=Path("demo_plant"), help="plant folder (default: ./demo_plant)")
    p.add_argument("--days", type=float, default=30.0, help="days of one-minute logs to generate (default 30)")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--max-steps", type=int, default=None, metavar="N", help="training steps (default: [train] steps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.cli import main

    config = args.dir / "plant.toml"
    quiet = ["--no-progress"] if args.no_progress else []
    steps: list[tuple[str, list[str]]] = []
    if not config.exists():
        steps.append(("generate", ["generate", "--out", str(args.dir), "--days", str(args.days),
                                   "--seed", str(args.seed)]))
    steps += [
        ("ingest", ["ingest", "--config", str(config)]),
        ("train", ["train", "--config", str(config), *quiet]
         + (["--max-steps", str(args.max_steps)] if args.max_steps else [])),
        ("score", ["score", "--config", str(config), *quiet]),
    ]
    t_all = time.perf_counter()
    for name, argv in steps:
        print(f"\n=== rmamba {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        rc = main(argv)
        print(f"=== {name}: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            print(f"demo stopped: `rmamba {name}` failed (exit {rc})")
            return rc
    from pipelines.config import load_plant_config

    plant = load_plant_config(config)
    print(f"\nDemo finished in {time.perf_counter() - t_all:.0f} s.")
    print(f"  alerts, scores and expert usage: {plant.database_url}")
    print(f"  models and runs (MLflow):        {plant.mlflow_tracking_uri}")
    print(f"  ground-truth anomaly labels:     {args.dir / 'labels.csv'}")
    print("  The operator dashboard is not built yet; until then list alerts with "
          f"`rmamba score --config {config}` (prints this run's alerts) or query the alerts table.")
    return 0
