"""Benchmark: streaming scoring throughput and peak memory against log length (ROM_SPEC section 4).

One equipment's log of L steps (n sensors, 1% missing) is generated chunk by chunk and fed through the streaming
path (`pipelines.score.stream_score` -> `RoMDetector.score`, state carried between chunks); nothing of size L is
ever materialised, so peak memory must stay flat in L. Each length runs in its own subprocess (peak RSS from
getrusage; on CUDA also torch.cuda.max_memory_allocated). Throughput counts model time only (data generation is
timed apart). The model is untrained (speed does not depend on the weights); its size is stated with the results.

Runs with torch + numpy only (no polars / mlflow / sqlalchemy on this path), so also on the GPU machines:

    .venv/bin/python benchmarks/score.py                        # CPU: 1e5, 1e6, 1e7 steps; writes BENCHMARKS.md
    python benchmarks/score.py --device cuda --chunk-len 65536 --feed 262144 --out score-gpu.json --no-write
    .venv/bin/python benchmarks/score.py --render score-cpu.json score-gpu.json   # section from saved results

The BENCHMARKS.md section lies between ``<!-- score:start -->`` and ``<!-- score:end -->``; the rest of the file
belongs to other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _markdown import write_section  # noqa: E402  (sibling module; benchmarks run as scripts)

DEFAULT_MD = ROOT / "BENCHMARKS.md"


def hardware(device: str) -> str:
    """The machine in one line: CPU model and cores (and the GPU when used), torch version and threads."""
    import torch

    model = platform.processor() or "unknown CPU"
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{model}, {cores} cores available"
    if device.startswith("cuda"):
        text = f"{torch.cuda.get_device_name(torch.device(device))} (host: {text})"
    return (f"{text}; torch {torch.__version__}, {torch.get_num_threads()} threads; Python "
            f"{platform.python_version()}")


def rss_now_mb() -> float:
    """Current resident set size (VmRSS) in MB; NaN where /proc is not available."""
    try:
        found = re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(found.group(1)) / 1024 if found else float("nan")
    except OSError:
        return float("nan")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def chunks(length: int, n_sensors: int, feed: int, seed: int = 0, timer: list[float] | None = None
           ) -> Iterator[np.ndarray]:
    """The log, ``feed`` rows at a time: slow sinusoids + noise per sensor, 1% of readings missing (NaN)."""
    rng = np.random.default_rng(seed)
    period = np.linspace(300, 3000, n_sensors)
    for s in range(0, length, feed):
        t0 = time.perf_counter()
        t = np.arange(s, min(s + feed, length))[:, None]
        v = np.sin(2 * np.pi * t / period) + 0.1 * rng.standard_normal((len(t), n_sensors))
        v[rng.random(v.shape) < 0.01] = np.nan
        if timer is not None:
            timer[0] += time.perf_counter() - t0
        yield v


def build_detector(args: argparse.Namespace):  # noqa: ANN201 (RoMDetector; imported lazily)
    import torch

    from pipelines.detector import NoveltyModel, RobustScaler, RoMDetector
    from rmamba import RoMConfig, RoMForecaster

    torch.manual_seed(0)
    cfg = RoMConfig(d_model=args.d_model, n_layers=args.layers, num_experts=args.experts, top_k=args.top_k)
    n = args.sensors
    model = RoMForecaster(cfg, {"unit": n}).to(args.device).eval()
    scaler = RobustScaler(np.zeros(n), np.full(n, 0.7))
    det = RoMDetector(model, {"unit": [f"s{i}" for i in range(n)]}, {"unit": scaler}, {"unit": 10.0})
    # the novelty part of the score, fitted as training does (on a short random series: speed only)
    fit = np.random.default_rng(1).normal(0, 1, (4096, n))
    det.novelty_["unit"] = NoveltyModel.fit(det.feature_moments(fit, "unit", skip=256))
    return det


def model_size(det) -> dict[str, int]:  # noqa: ANN001
    from rmamba import count_parameters

    rows = count_parameters(det.model.cfg, det.model.equipment_types)
    return {"params_total": sum(r.total for r in rows), "params_active": sum(r.active for r in rows)}


def child(args: argparse.Namespace) -> dict:
    """One length in this process: warm up, stream the log through the detector, report time and memory."""
    import torch

    from pipelines.score import stream_score

    if args.threads:
        torch.set_num_threads(args.threads)
    det = build_detector(args)
    # one whole model call, so the timed part finds every kernel compiled for the chunk length it will run at (a
    # shorter warm-up left that to the first timed chunk: ~0.5 s of the 1e5 row on a GPU)
    warm = next(chunks(args.chunk_len, args.sensors, args.chunk_len, seed=1))
    det.score(warm, "unit", chunk_len=args.chunk_len)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gen_time = [0.0]
    steps = scored = flagged = 0
    peak = -np.inf
    t0 = time.perf_counter()
    for r in stream_score(det, chunks(args.length, args.sensors, args.feed, timer=gen_time), "unit",
                          chunk_len=args.chunk_len):
        steps += len(r.score)
        scored += int(r.scored.sum())
        flags = det.flags(r.score, "unit")
        flagged += int(flags.sum())
        peak = max(peak, float(np.nanmax(r.score)) if r.scored.any() else peak)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    model_s = wall - gen_time[0]
    return {
        "length": args.length, "steps": steps, "scored_steps": scored, "flagged_steps": flagged,
        "seconds": wall, "model_seconds": model_s, "steps_per_s": steps / model_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_warmup_mb": rss_before,
        "rss_end_mb": rss_now_mb(),
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "polars_imported": "polars" in sys.modules, "mlflow_imported": "mlflow" in sys.modules,
        "sqlalchemy_imported": "sqlalchemy" in sys.modules, "load_average": load_average(),
    }


def run_all(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    det = build_detector(args)
    cfg = det.model.cfg
    result = {
        "benchmark": "score", "device": args.device, "hardware": hardware(args.device),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "d_state": cfg.d_state, "d_inner": cfg.d_inner,
                  "num_experts": cfg.num_experts, "top_k": cfg.top_k, **model_size(det)},
        "sensors": args.sensors, "chunk_len": args.chunk_len, "feed": args.feed, "threads": torch.get_num_threads(),
        "load_average_start": load_average(), "runs": [],
    }
    del det
    for length in args.lengths:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--length", str(length)] + _passthrough(args)
        print(f"score benchmark: L={length:,} ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"L={length}: child failed ({done.returncode}):\n{done.stderr[-4000:]}")
        run = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {run['steps_per_s']:,.0f} steps/s, peak RSS {run['peak_rss_mb']:.0f} MB "
              f"({run['seconds']:.0f} s)", file=sys.stderr, flush=True)
        result["runs"].append(run)
        if args.out:  # keep what is done if a later length is stopped
            Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def _passthrough(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device, "--sensors", str(args.sensors), "--d-model", str(args.d_model), "--layers",
            str(args.layers), "--experts", str(args.experts), "--top-k", str(args.top_k), "--chunk-len",
            str(args.chunk_len), "--feed", str(args.feed), "--threads", str(args.threads)]


def render(results: list[dict], note: str = "") -> str:
    """The markdown section for one or more result sets (e.g. CPU and GPU)."""
    lines = ["## Streaming scoring: throughput and memory against log length (`benchmarks/score.py`)", "",
             "One equipment's log fed chunk by chunk from a generator through `stream_score` -> `RoMDetector.score` "
             "(state carried; nothing of the log's length is materialised). Throughput counts model time (data "
             "generation excluded); peak RSS is the whole process (Python, torch, the model), one process per "
             "length: flat in L means memory does not grow with the log.", ""]
    for r in results:
        m = r["model"]
        kind = "dense Mamba" if not m["num_experts"] else f"RoM top-{m['top_k']} of {m['num_experts']} experts"
        lines += [f"### {r['device']}: {r['hardware']}", "",
                  f"Model: {kind}, d_model {m['d_model']}, {m['n_layers']} layers, d_inner {m['d_inner']}, "
                  f"d_state {m['d_state']}: {m['params_total']:,} parameters ({m['params_active']:,} active per "
                  f"step); {r['sensors']} sensors; chunk_len {r['chunk_len']}, fed {r['feed']:,} steps at a time. "
                  f"{r['date']}; load average at start {r['load_average_start']}.", "",
                  "| log length (steps) | seconds | steps/s | peak RSS (MB) | peak RSS after warm-up (MB) | "
                  "RSS at end (MB) | peak GPU memory (MB) |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for run in r["runs"]:
            gpu = f"{run['cuda_peak_mb']:.0f}" if run.get("cuda_peak_mb") is not None else "-"
            lines.append(f"| {run['length']:,} | {run['seconds']:,.1f} | {run['steps_per_s']:,.0f} | "
                         f"{run['peak_rss_mb']:,.0f} | {run['rss_after_warmup_mb']:,.0f} | "
                         f"{run.get('rss_end_mb', float('nan')):,.0f} | {gpu} |")
        if r.get("note"):
            lines += ["", r["note"]]
        lines.append("")
    if note:
        lines += [note, ""]
    return "\n".join(lines)


def _length(text: str) -> int:
    value = float(text)
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number of steps such as 1e6, got {text!r}")
    return int(value)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=lambda s: [_length(x) for x in s.split(",")], default=[10**5, 10**6, 10**7],
                   help="comma-separated log lengths in steps (default 1e5,1e6,1e7)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--sensors", type=int, default=8)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--chunk-len", type=int, default=4096, help="steps per model call")
    p.add_argument("--feed", type=int, default=65536, help="steps per chunk the generator yields")
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    p.add_argument("--markdown", type=Path, default=DEFAULT_MD, help="file holding the section")
    p.add_argument("--note", default="", help="a sentence to add under the tables")
    p.add_argument("--render", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only rewrite the section from saved result files (e.g. a CPU and a GPU run)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--length", type=_length, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(child(args)))
        return
    if args.render:
        results = [json.loads(f.read_text()) for f in args.render]
    else:
        results = [run_all(args)]
        if args.note:
            results[0]["note"] = args.note
        if args.out:
            args.out.write_text(json.dumps(results[0], indent=2))
        print(json.dumps(results[0], indent=2))
    body = render(results)
    print(body)
    if not args.no_write:
        write_section(args.markdown, "score", body)
        print(f"wrote the score section of {args.markdown}", file=sys.stderr)


if __name__ == "__main__":
    main()
