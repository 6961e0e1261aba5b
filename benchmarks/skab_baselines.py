"""Classical baselines on SKAB valve1 under the docs/EVALUATION.md protocol; prints a markdown table.

The protocol, metrics and table are pipelines/evaluate.py's (`rmamba evaluate --dataset skab` runs the same with
the neural models too): per labelled file, fit on its first 400 rows plus anomaly-free/anomaly-free.csv (normal
data), each series scaled by its own training rows, threshold label-free from the training scores, evaluate on the
remaining rows; metrics per file, then macro (mean ± std over seeds); pooled columns as SKAB's leaderboard counts
them (that leaderboard also covers valve2 and other/, which are not here).

Usage: .venv/bin/python benchmarks/skab_baselines.py [DATA_DIR] [--q 1e-3] [--method pot] [--seeds 0 1 2]
       [--max-buffer N] [--no-extra-normal] [--no-series-scaling]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.evaluate import CLASSICAL, EvalConfig, evaluate, format_markdown, skab_data  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    repo = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", nargs="?", type=Path, default=repo.parent / "shared" / "data" / "skab")
    ap.add_argument("--method", choices=["pot", "quantile"], default="pot", help="label-free threshold rule")
    ap.add_argument("--q", type=float, default=1e-3, help="risk level: target false-alarm fraction on normal data")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds for IForest and random")
    ap.add_argument("--max-buffer", type=int, default=None, help="VUS max buffer; default TSB-AD's ACF window")
    ap.add_argument("--no-extra-normal", action="store_true",
                    help="train on the first 400 rows only (anomaly-free.csv is another operating regime)")
    ap.add_argument("--no-series-scaling", action="store_true",
                    help="raw sensor units instead of scaling each series by its own training rows")
    args = ap.parse_args(argv)

    data = skab_data(args.data_dir, extra_normal=not args.no_extra_normal,
                     series_scaling=not args.no_series_scaling, max_buffer=args.max_buffer)
    cfg = EvalConfig(seeds=tuple(args.seeds), methods=CLASSICAL, threshold_method=args.method, q=args.q)
    t0 = time.perf_counter()
    metrics, _ = evaluate(data, cfg)
    print(f"{platform.processor() or platform.machine()}, {time.perf_counter() - t0:.1f} s")
    print(f"VUS max buffer per file: {[s.max_buffer for s in data.series]}\n")
    print(format_markdown(metrics))


if __name__ == "__main__":
    main()
