"""MLflow logging of an evaluation (the registry edge for `rmamba evaluate`).

Kept apart from pipelines/registry.py until that module offers a generic ``log_evaluation``; then this function
moves there (STYLE.md: MLflow calls sit in one pipelines module).
"""

from __future__ import annotations

import math
from pathlib import Path

EXPERIMENT = "evaluation"


def _flat_metrics(metrics: dict) -> dict[str, float]:
    """{'<method>.<key>': macro mean, '<method>.<key>.std': std over seeds, ...} for finite values only."""
    out: dict[str, float] = {}
    for method, entry in metrics.get("methods", {}).items():
        for key, value in entry.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"{method}.{key}"] = float(value)
        for key, value in entry.get("std", {}).items():
            out[f"{method}.{key}.std"] = value
        for key, value in entry.get("pooled", {}).items():
            out[f"{method}.pooled_{key}"] = value["mean"]
        for key in ("nll_test", "nll_test_normal"):
            if key in entry:
                out[f"{method}.{key}"] = entry[key]["mean"]
        for key in ("total", "active"):
            if "params" in entry:
                out[f"{method}.params_{key}"] = float(entry["params"][key])
        for kind, d in entry.get("per_kind", {}).items():
            for key in ("event_recall", "point_recall", "vus_pr"):
                out[f"{method}.kind.{kind}.{key}"] = d[key]["mean"]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def log_evaluation(out_dir: str | Path, metrics: dict, tracking_uri: str) -> str:
    """One MLflow run in experiment 'evaluation': params (dataset, protocol, seeds, config), the macro metrics
    of every method (and their std over seeds), and every file of ``out_dir`` as artifacts. Returns the run id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(EXPERIMENT)
    meta = metrics.get("meta", {})
    params = {"dataset": metrics.get("dataset"), "protocol": meta.get("protocol", "")[:500],
              "seeds": ",".join(str(s) for s in meta.get("seeds", [])), "threshold": meta.get("threshold", "")}
    params.update({f"config.{k}": str(v)[:500] for k, v in meta.get("config", {}).items()})
    with mlflow.start_run(run_name=f"evaluate-{metrics.get('dataset')}") as run:
        mlflow.log_params(params)
        mlflow.log_metrics(_flat_metrics(metrics))
        mlflow.log_artifacts(str(out_dir))
        return run.info.run_id
