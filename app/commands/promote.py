"""`rmamba promote`: the promotion gate. 'champion' moves to the 'challenger' version when it is at least as good.

The decision and its numbers are printed, set as tags on the challenger version and logged as an MLflow run
(`pipelines.registry.promote`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote", help="move 'champion' to the 'challenger' model version if it is at least as good",
        description="Compare the registered model's 'challenger' version with its 'champion' on a validation "
                    "metric of their training runs (default val_nll, lower is better) and move the 'champion' "
                    "alias when the challenger is at least as good, or when there is no champion yet.")
    p.add_argument("--config", type=Path, required=True, help="plant.toml (for the MLflow tracking URI)")
    p.add_argument("--name", default=None, help="registered model name (default: <plant name>-detector)")
    p.add_argument("--metric", default="val_nll", help="run metric to compare (default: val_nll)")
    p.add_argument("--higher-is-better", action="store_true", help="the metric grows with quality (e.g. an F1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.commands.train import format_decision, model_name
    from pipelines import registry
    from pipelines.config import load_plant_config

    plant = load_plant_config(args.config)
    name = model_name(plant, args.name)
    decision = registry.promote(name, tracking_uri=plant.mlflow_tracking_uri, metric=args.metric,
                                higher_is_better=args.higher_is_better)
    print(format_decision(decision))
    print(f"{decision.metric}: challenger {decision.challenger_value}, champion {decision.champion_value}")
    return 0
