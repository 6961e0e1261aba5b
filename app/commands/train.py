"""`rmamba train`: train the detector on the ingested store, register it as challenger, run the promotion gate.

The application side of training: it decides the paths (checkpoints, MLflow artifacts, local model folders) and the
tracking URI from plant.toml, and owns the terminal; the work is `pipelines.train.train_from_store` and
`pipelines.registry`.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train the detector on the ingested store and register it as challenger",
        description="Train the RoM detector on the ingested store (the [model] and [train] tables of plant.toml), "
                    "fit label-free thresholds on the held-back validation period, log the run to MLflow, register "
                    "the model with the alias 'challenger' and run the promotion gate (see `rmamba promote`).")
    p.add_argument("--config", type=Path, required=True, help="plant.toml")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this plant")
    p.add_argument("--max-steps", type=int, default=None, metavar="N", help="train N steps (overrides [train] steps)")
    p.add_argument("--no-register", action="store_true",
                   help="do not log to MLflow; save the detector folder under <plant>/models/ instead")
    p.add_argument("--no-promote", action="store_true", help="register as challenger but skip the promotion gate")
    p.add_argument("--name", default=None, help="registered model name (default: <plant name>-detector)")
    p.add_argument("--out", type=Path, default=None, help="also save the detector folder here")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (overrides [train] device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def model_name(plant: Any, name: str | None = None) -> str:
    """The registered model name: --name, else '<plant name>-detector' (characters MLflow accepts)."""
    return name or re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{plant.name}-detector")


def plant_dir(plant: Any) -> Path:
    return plant.config_path.parent if plant.config_path else Path.cwd()


def artifact_location(tracking_uri: str, plant: Any) -> str | None:
    """MLflow artifacts next to a SQLite tracking database (else the tracking server decides)."""
    m = re.match(r"^sqlite(?:\+\w+)?:///(.+)$", tracking_uri)
    if m and not m.group(1).startswith(":memory:"):
        return str(Path(m.group(1)).parent / "mlartifacts")
    return None if "://" in tracking_uri else str(plant_dir(plant) / "mlartifacts")


def latest_ingest_report(plant: Any) -> Path | None:
    reports = sorted(Path(plant.reports).glob("ingest-*.json"), key=lambda p: p.stat().st_mtime)
    return reports[-1] if reports else None


def run(args: argparse.Namespace) -> int:
    from pipelines.config import load_plant_config
    from pipelines.train import TrainConfig, resolve_device, train_from_store

    plant = load_plant_config(args.config)
    cfg = TrainConfig.from_dict(plant.train)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ValueError(f"--max-steps: expected an integer >= 1, got {args.max_steps}")
        cfg = replace(cfg, steps=args.max_steps, warmup_steps=min(cfg.warmup_steps, args.max_steps))
    if args.device:
        cfg = replace(cfg, device=args.device)
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else Path("checkpoints") / "train"
    cfg = replace(cfg, checkpoint_dir=str(ckpt if ckpt.is_absolute() else plant_dir(plant) / ckpt))
    name = model_name(plant, args.name)

    if cfg.train_until is None:
        print("note: [train] train_until is not set: every ingested reading is used for training and thresholds "
              "(set it to the end of a period known to be normal)", file=sys.stderr)
    print(f"training on {plant.store} ({resolve_device(cfg.device)}; {cfg.steps} steps, window {cfg.window}, "
          f"batch {cfg.batch_size} per type; checkpoints in {cfg.checkpoint_dir})", file=sys.stderr)
    result = train_from_store(plant, cfg=cfg, resume=args.resume, progress=not args.no_progress)
    print(summary(result))

    if args.no_register or args.out:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out = args.out or plant_dir(plant) / "models" / f"{name}-{stamp}"
        print(f"detector saved to {result.detector.save(out)}")
    if args.no_register:
        return 0

    from pipelines import registry

    uri = plant.mlflow_tracking_uri
    logged = registry.log_training(
        result, tracking_uri=uri, model_name=name, artifact_location=artifact_location(uri, plant),
        ingest_report=latest_ingest_report(plant), run_name=f"train {datetime.now(UTC):%Y-%m-%d %H:%M}",
        params={"plant": plant.name, "config": str(plant.config_path)})
    print(f"registered {name} version {logged.version} as '{registry.CHALLENGER}' (run {logged.run_id}, {uri})")
    if not args.no_promote:
        print(format_decision(registry.promote(name, tracking_uri=uri)))
    return 0


def summary(result: Any) -> str:
    """Plain-text summary of a TrainResult: run length, validation NLL, thresholds, expert usage per type."""
    m, det = result.metrics, result.detector
    info = det.info.get("train_config", {})
    lines = [
        f"trained {int(m['steps'])} steps ({int(m['epochs'])} epochs, best epoch {int(m['best_epoch'])}"
        f"{', stopped early' if m['stopped_early'] else ''}) in {m['train_seconds']:.1f} s, "
        f"{m['tokens_per_s']:,.0f} tokens/s on {det.device}; {int(m['params_total']):,} parameters "
        f"({int(m['params_active']):,} active per token)",
        f"validation NLL {m['val_nll']:.4f} per observed value (" + ", ".join(
            f"{t} {m[f'val_nll.{t}']:.4f}" for t in det.sensors if f"val_nll.{t}" in m) + ")",
        f"thresholds ({info.get('threshold_method')}, q={info.get('threshold_q')}): " + (", ".join(
            f"{t} {v:.3f}" for t, v in det.threshold_.items()) or "none"),
    ]
    if result.routing_usage:
        lines.append("expert usage on validation steps (share per expert; one bracket per layer):")
        width = max(len(t) for t in result.routing_usage)
        for t, usage in result.routing_usage.items():
            layers = "  ".join("[" + " ".join(f"{u:.2f}" for u in row) + "]" for row in usage)
            lines.append(f"  {t:<{width}}  {layers}")
    return "\n".join(lines)


def format_decision(d: Any) -> str:
    """One line for a PromotionDecision."""
    if d.promoted:
        return f"promotion: 'champion' -> version {d.challenger_version} ({d.reason})"
    keep = f"version {d.champion_version}" if d.champion_version else "unset"
    return f"promotion: 'champion' stays {keep}; challenger version {d.challenger_version} not promoted ({d.reason})"
