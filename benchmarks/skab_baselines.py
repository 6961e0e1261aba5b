"""Classical baselines on SKAB valve1 under the docs/EVALUATION.md protocol; prints a markdown table.

Per labelled file: fit on its first 400 rows plus anomaly-free/anomaly-free.csv (normal data), threshold label-free
from the training scores (POT), evaluate on the remaining rows. Metrics are per file, then macro-averaged
(mean ± std over files x seeds). The last columns pool the confusion counts over all files, the way SKAB's own
leaderboard computes F1 / FAR / MAR (that leaderboard also covers valve2 and other/, which are not here).

Usage: .venv/bin/python benchmarks/skab_baselines.py [DATA_DIR] [--q 1e-3] [--method pot] [--seeds 0 1 2]
       [--max-buffer N] [--no-extra-normal]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.baselines import IForestDetector, PCADetector, RandomDetector  # noqa: E402
from pipelines.metrics import evaluate_series, far_mar, macro, point_prf, tsb_sliding_window  # noqa: E402
from pipelines.skab import SKAB_SENSORS, read_skab_file  # noqa: E402

N_TRAIN = 400
COLUMNS = ["vus_pr", "vus_roc", "auc_pr", "auc_roc", "f1", "event_f1", "affiliation_f1", "far", "mar", "prevalence"]


def read_xy(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """One SKAB csv -> (X (n_time, 8) float64 sensors, anomaly labels (n_time,) or None)."""
    series = read_skab_file(path)
    return series.frame.select(SKAB_SENSORS).to_numpy().astype(np.float64), series.labels


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
    args = ap.parse_args(argv)

    files = sorted((args.data_dir / "valve1").glob("*.csv"), key=lambda p: int(p.stem))
    if not files:
        raise SystemExit(f"no SKAB files under {args.data_dir / 'valve1'}: pass the SKAB folder as DATA_DIR")
    X_free, _ = read_xy(args.data_dir / "anomaly-free" / "anomaly-free.csv")
    thr = dict(threshold_method=args.method, q=args.q)
    detectors = {
        "random (uniform)": lambda seed: RandomDetector(random_state=seed, **thr),
        "PCA T^2+Q": lambda seed: PCADetector(**thr),
        "IsolationForest": lambda seed: IForestDetector(random_state=seed, **thr),
    }
    seeded = {"random (uniform)": args.seeds, "PCA T^2+Q": [0], "IsolationForest": args.seeds}

    t0 = time.perf_counter()
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in detectors}
    pooled: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {name: ([], []) for name in detectors}
    windows = []
    for path in files:
        X, y = read_xy(path)
        X_train = X[:N_TRAIN] if args.no_extra_normal else np.vstack([X[:N_TRAIN], X_free])
        X_test, y_test = X[N_TRAIN:], y[N_TRAIN:]
        window = args.max_buffer if args.max_buffer is not None else tsb_sliding_window(X_test[:, 0])
        windows.append(window)
        for name, make in detectors.items():
            for seed in seeded[name]:
                det = make(seed).fit(X_train)
                scores = det.decision_function(X_test)
                rows[name].append(evaluate_series(y_test, scores, det.threshold_, max_buffer=window))
                pooled[name][0].append(y_test)
                pooled[name][1].append(scores > det.threshold_)
    elapsed = time.perf_counter() - t0

    extra = "" if args.no_extra_normal else f" + anomaly-free ({len(X_free)} rows)"
    print(f"SKAB valve1: {len(files)} files, train = first {N_TRAIN} rows{extra}, "
          f"threshold {args.method} q={args.q:g} on training scores, seeds {args.seeds}")
    print(f"VUS max buffer per file (TSB-AD ACF window unless --max-buffer): {windows}")
    print(f"{platform.processor() or platform.machine()}, {elapsed:.1f} s\n")
    head = ["method", *COLUMNS, "pooled F1", "pooled FAR %", "pooled MAR %"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in detectors:
        m = macro(rows[name])
        cells = [f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" if k not in ("far", "mar")
                 else f"{m[k]['mean']:.1f} ± {m[k]['std']:.1f}" for k in COLUMNS]
        y_all, p_all = np.concatenate(pooled[name][0]), np.concatenate(pooled[name][1])
        far, mar = far_mar(y_all, p_all)
        cells += [f"{point_prf(y_all, p_all).f1:.3f}", f"{far:.1f}", f"{mar:.1f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    y_all = np.concatenate(pooled["PCA T^2+Q"][0])
    p = y_all.mean()
    print(f"\nFlag-everything reference: pooled F1 {2 * p / (1 + p):.3f} (FAR 100, MAR 0); pooled prevalence {p:.3f}")


if __name__ == "__main__":
    main()
