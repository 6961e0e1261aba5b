"""Benchmark: training throughput of the real training loop on the embedded plant, on the CPU or a GPU.

Simulates the synthetic plant in memory (pipelines.generate), takes every unit's anomaly-free training period, and
runs ``pipelines.train.train_detector`` unchanged (the device is picked by the same ``device`` setting the
application uses: bf16 autocast and the Triton scan on CUDA, fp32 and the chunked CPU scan on the CPU). Step times
come from the loop's own ``on_step`` callback (it receives the step's loss as a Python float, so every step is
synchronised); the first steps (warm-up, Triton compilation) are excluded from the median.

    .venv/bin/python benchmarks/train_step.py --out benchmarks/results/train_cpu.json   # here (2 cores)
    python benchmarks/train_step.py --device cuda --out train-gpu.json                 # on the GPU machine
    .venv/bin/python benchmarks/train_step.py --render benchmarks/results/train_cpu.json train-gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import write_section  # noqa: E402  (sibling module; benchmarks run as scripts)
from score import hardware, load_average  # noqa: E402  (the scoring benchmark's machine description)


def plant_series(days: float, seed: int) -> tuple[dict, dict]:
    """{type: [values (T, n) float64]} of every unit's anomaly-free first 40 %, and {type: sensor names}."""
    from pipelines.generate import simulate_plant

    truth = simulate_plant(days=days, seed=seed, clean_fraction=0.4)
    series: dict[str, list] = {}
    sensors: dict[str, list[str]] = {}
    for unit in truth.units:
        names = [c for c in unit.data.columns if c != "timestamp"]
        x = unit.data.select(names).to_numpy().astype("float64")
        series.setdefault(unit.equipment_type, []).append(x[: int(round(0.4 * len(x)))])
        sensors[unit.equipment_type] = names
    return series, sensors


def run(args: argparse.Namespace) -> dict:
    import torch

    from pipelines.train import TrainConfig, resolve_device, train_detector
    from rmamba import RoMConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    series, sensors = plant_series(args.days, args.seed)
    model_cfg = RoMConfig(d_model=args.d_model, n_layers=args.layers, num_experts=args.experts, top_k=args.top_k)
    cfg = TrainConfig(window=args.window, batch_size=args.batch_size, steps=args.steps, steps_per_epoch=args.steps,
                      warmup_steps=min(5, args.steps), patience=0, device=args.device, seed=0)
    stamps: list[float] = []
    t0 = time.perf_counter()
    result = train_detector(series, sensors, model_cfg, cfg, on_step=lambda step, loss: stamps.append(
        time.perf_counter()))
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps, stamps[1:])][args.skip:]
    if not steps:
        raise SystemExit(f"--steps {args.steps} leaves no timed steps after skipping {args.skip}")
    step_s = statistics.median(steps)
    n_types = len(series)
    windows = n_types * args.batch_size
    device = str(resolve_device(args.device))
    det = result.detector
    total_params = sum(p.numel() for p in det.model.parameters())
    return {
        "device": device, "hardware": hardware(device), "load": load_average(),
        "model": {"d_model": args.d_model, "n_layers": args.layers, "experts": args.experts, "top_k": args.top_k,
                  "params": total_params},
        "equipment_types": n_types, "sensors": {t: len(v) for t, v in sensors.items()},
        "window": args.window, "batch_size": args.batch_size, "windows_per_step": windows,
        "steps_run": len(stamps), "steps_timed": len(steps), "step_s_median": step_s,
        "step_s_min": min(steps), "step_s_max": max(steps),
        "timesteps_per_s": windows * args.window / step_s, "wall_s_total": total,
        "final_val_nll": result.metrics.get("val_nll") if hasattr(result, "metrics") else None,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def render(results: list[dict]) -> str:
    lines = [
        "## Training throughput on the embedded plant (benchmarks/train_step.py)",
        "",
        "The real training loop (`pipelines.train.train_detector`, no benchmark-specific code path) on the simulated "
        "plant's anomaly-free training periods: one step = one window per equipment type and batch row, forward, "
        "NLL + routing losses, backward, clip, AdamW. Median step time over the timed steps (warm-up steps "
        "excluded); every step ends in a host sync (the loss is read as a float).",
        "",
        "| device | hardware | model (d_model x layers, E, K) | params | windows/step x window | step s median "
        "(min-max) | timesteps/s | load |",
        "|---|---|---|---:|---|---|---:|---|",
    ]
    for r in results:
        m = r["model"]
        lines.append(f"| {r['device']} | {r['hardware']} | {m['d_model']} x {m['n_layers']}, {m['experts']}, "
                     f"{m['top_k']} | {m['params']:,} | {r['windows_per_step']} x {r['window']} | "
                     f"{r['step_s_median']:.3f} ({r['step_s_min']:.3f}-{r['step_s_max']:.3f}) | "
                     f"{r['timesteps_per_s']:,.0f} | {r['load']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (the TrainConfig.device setting)")
    p.add_argument("--days", type=float, default=10.0, help="days of simulated plant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=2, help="windows per equipment type per step")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="first step intervals left out of the median")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--render", type=Path, nargs="+", help="only write BENCHMARKS.md from saved JSON files")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    if a.render:
        results = [json.loads(f.read_text()) for f in a.render]
    else:
        results = [run(a)]
        if a.out:
            a.out.write_text(json.dumps(results[0], indent=1))
    body = render(results)
    print(body)
    if a.render and not a.no_write:
        write_section(ROOT / "BENCHMARKS.md", "train_step", body)


if __name__ == "__main__":
    main()
