"""`rmamba evaluate`: detection quality of the RoM model and every baseline under docs/EVALUATION.md."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Presets per dataset: full runs, and --quick (CPU minutes). Flags given on the command line win.
PRESETS = {
    ("skab", False): {"steps": 600, "window": 128, "batch_size": 8, "steps_per_epoch": 25},
    ("skab", True): {"steps": 60, "window": 128, "batch_size": 8, "steps_per_epoch": 20},
    ("synthetic", False): {"steps": 1000, "window": 256, "batch_size": 4, "steps_per_epoch": 100, "days": 14.0},
    ("synthetic", True): {"steps": 40, "window": 128, "batch_size": 4, "steps_per_epoch": 20, "days": 6.0},
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="evaluate the RoM detector against the baselines (VUS-PR, F1, ...) on SKAB or a synthetic "
                         "plant",
        description="Train and score the RoM model (E experts, top-K), dense Mamba models with the same ACTIVE and "
                    "the same TOTAL parameters, PCA T^2+Q, IsolationForest and random scores under one protocol "
                    "(docs/EVALUATION.md): label-free thresholds from training / held-back normal data, metrics "
                    "per series then macro, several seeds. Writes metrics.json, metrics.md and score plots to "
                    "--out, and logs them to MLflow when --tracking-uri is given.")
    p.add_argument("--dataset", required=True, choices=["synthetic", "skab"], help="which benchmark")
    p.add_argument("--path", type=Path, default=None, metavar="DIR",
                   help="skab: the SKAB folder (valve1/, anomaly-free/; required). synthetic: folder to write the "
                        "generated plant's logs into (optional; default: simulate in memory only)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output folder (default runs/evaluate-<dataset>)")
    p.add_argument("--seeds", type=_positive_int, default=3, metavar="N", help="seeds 0..N-1 (default 3)")
    p.add_argument("--quick", action="store_true", help="short training and a short plant: minutes on a CPU")
    p.add_argument("--methods", default=None, metavar="M,...",
                   help="comma-separated subset of rom,dense_active,dense_total,pca,iforest,random (default all)")
    p.add_argument("--steps", type=_positive_int, default=None, help="training steps of each neural model")
    p.add_argument("--window", type=int, default=None, help="training window length in steps")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="windows per equipment type per step")
    p.add_argument("--lr", type=_positive_float, default=3e-3,
                   help="peak AdamW learning rate of every neural model (default 3e-3)")
    p.add_argument("--d-model", type=_positive_int, default=32, help="RoM model width (default 32)")
    p.add_argument("--expand", type=_positive_int, default=2,
                   help="SSM width factor of every mixer, d_inner = expand * d_model (default 2); the dense "
                        "baselines use the same expand")
    p.add_argument("--layers", type=_positive_int, default=2, help="RoM model layers (default 2)")
    p.add_argument("--experts", type=_positive_int, default=8, help="RoM experts E (default 8)")
    p.add_argument("--top-k", type=_positive_int, default=1, help="experts per token K (default 1)")
    p.add_argument("--gate-on-all", action="store_true",
                   help="RoM: weight W_x and W_z by the gate too, not only W_o (ROM_SPEC 2's ablation)")
    p.add_argument("--days", type=float, default=None, help="synthetic: days of plant data (default 14; quick 6)")
    p.add_argument("--plant-seed", type=int, default=0, help="synthetic: generator seed (default 0)")
    p.add_argument("--tracking-uri", default=None, metavar="URI", help="MLflow tracking URI to log the evaluation to")
    p.add_argument("--device", default="auto", help="training device: auto (cuda when available), cpu, cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pipelines.evaluate import (
        METHODS,
        EvalConfig,
        evaluate,
        format_markdown,
        log_to_registry,
        skab_data,
        synthetic_data,
        write_outputs,
    )

    preset = dict(PRESETS[(args.dataset, args.quick)])
    for key in ("steps", "window", "batch_size", "days"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else METHODS
    cfg = EvalConfig(seeds=tuple(range(args.seeds)), methods=methods, d_model=args.d_model, n_layers=args.layers,
                     expand=args.expand, num_experts=args.experts, top_k=args.top_k,
                     gate_on_all=args.gate_on_all, steps=preset["steps"],
                     window=preset["window"], batch_size=preset["batch_size"],
                     steps_per_epoch=preset["steps_per_epoch"],
                     warmup_steps=min(20, preset["steps"]), lr=args.lr, device=args.device)
    out = args.out or Path("runs") / f"evaluate-{args.dataset}"
    t0 = time.perf_counter()
    if args.dataset == "skab":
        if args.path is None:
            raise ValueError("--path: the SKAB folder is required for --dataset skab (e.g. ../shared/data/skab)")
        data = skab_data(args.path)
    else:
        data = synthetic_data(days=preset["days"], seed=args.plant_seed, out_dir=args.path)
    print(f"{data.protocol}; methods {', '.join(methods)}; seeds {list(cfg.seeds)}; "
          f"training {cfg.steps} steps x {cfg.batch_size} windows of {cfg.window}", file=sys.stderr)
    with tqdm(total=len(methods) * len(cfg.seeds), unit="run", desc="evaluate", dynamic_ncols=True) as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)

        metrics, runs = evaluate(data, cfg, progress)
    paths = write_outputs(data, metrics, runs, out, cfg.plot_series)
    print(format_markdown(metrics))
    print(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - t0:.0f} s")
    if args.tracking_uri:
        run_id = log_to_registry(out, metrics, args.tracking_uri)
        print(f"logged to MLflow {args.tracking_uri}: run {run_id}")
    return 0
