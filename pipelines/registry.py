"""The registry edge: every MLflow call of the project sits here (and in the logged pyfunc file itself).

    log_training(result, ...)  one run: params, per-epoch metrics, final metrics, the ingest report, evaluation
                               tables and plots; the detector as a pyfunc "model from code" (pipelines/pyfunc_model.py)
                               registered under ``model_name`` and given the alias ``challenger``
    promote(model_name, ...)   the promotion gate: ``champion`` moves to the challenger only when it is at least as
                               good on the validation metric (or no champion exists); the decision and its numbers
                               are returned, set as tags on the challenger version and logged as a run
    load_pyfunc / load_detector  the registered model back, as an MLflow pyfunc or as a `RoMDetector`

mlflow is imported inside the functions (``import mlflow`` costs ~1.5 s) with telemetry off. The caller decides the
tracking URI and the artifact location (the application reads them from plant.toml); stages (aliases) are not
used: they are deprecated in MLflow 3.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

    from pipelines.detector import RoMDetector
    from pipelines.train import TrainResult

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # in the working directory; the application passes the plant's URI
CHALLENGER = "challenger"
CHAMPION = "champion"
MODEL_ARTIFACT = "detector"          # name of the logged model inside a run
EPOCH_METRICS = ("train_nll", "val_nll", "aux_loss", "lr", "tokens_per_s")
ROOT = Path(__file__).resolve().parent.parent
PYFUNC_FILE = Path(__file__).resolve().with_name("pyfunc_model.py")
# What the logged model needs to import: the model and kernels packages, and the detector module of pipelines.
CODE_PACKAGES = ("rmamba", "kernels")
CODE_MODULES = ("pipelines/__init__.py", "pipelines/detector.py")
RUNTIME_REQUIREMENTS = ("torch", "numpy", "polars", "pandas", "pyarrow", "mlflow")


def _mlflow(tracking_uri: str) -> Any:
    """Import mlflow (telemetry off) and point it at ``tracking_uri`` (tracking and registry)."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return mlflow


def _client(tracking_uri: str) -> Any:
    _mlflow(tracking_uri)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = Path(artifact_location).resolve().as_uri() if artifact_location else None
    return client.create_experiment(name, artifact_location=location)


def pip_requirements() -> list[str]:
    """Pinned runtime requirements of the logged model (the versions installed here; local tags dropped)."""
    return [f"{d}=={metadata.version(d).split('+')[0]}" for d in RUNTIME_REQUIREMENTS]


def stage_code(dst: Path) -> list[str]:
    """Copy what the pyfunc file imports into ``dst``; returns the code_paths for log_model."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    paths = []
    for pkg in CODE_PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=ignore)
        paths.append(str(dst / pkg))
    for rel in CODE_MODULES:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)
    paths.append(str(dst / "pipelines"))
    return paths


def model_signature(detector: RoMDetector) -> Any:
    """Outputs and params of the pyfunc. No input schema: MLflow enforces one on pandas only (a polars frame would
    be refused); the model checks its inputs itself and names missing sensors."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from pipelines.detector import ATTRIBUTION_PREFIX

    sensors = sorted({s for names in detector.sensors.values() for s in names})
    outputs = Schema([
        ColSpec("datetime", "timestamp", required=False), ColSpec("string", "equipment", required=False),
        ColSpec("string", "equipment_type"), ColSpec("double", "score"), ColSpec("boolean", "flag", required=False),
        *[ColSpec("double", ATTRIBUTION_PREFIX + s, required=False) for s in sensors],
    ])
    params = ParamSchema([ParamSpec("equipment_type", "string", ""), ParamSpec("chunk_len", "long", 4096)])
    return ModelSignature(inputs=None, outputs=outputs, params=params)


def input_example(detector: RoMDetector, rows: int = 8) -> Any:
    """A few rows of the first equipment type at its training medians (pandas, as MLflow stores examples)."""
    import numpy as np
    import pandas as pd

    etype = next(iter(detector.sensors))
    med = detector.scalers_[etype].median_
    frame = {"timestamp": pd.date_range("2026-01-01", periods=rows, freq="min").astype(str),
             "equipment_type": [etype] * rows}
    frame.update({s: np.full(rows, float(med[j])) for j, s in enumerate(detector.sensors[etype])})
    return pd.DataFrame(frame)


@dataclass
class LoggedRun:
    """Where a training run went: the MLflow run, and the registered version (None when not registered)."""

    run_id: str
    experiment_id: str
    model_uri: str
    model_name: str | None
    version: str | None


def _finite(d: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, int | float) and math.isfinite(float(v))}


def _params(result: TrainResult, extra: Mapping[str, Any] | None) -> dict[str, str]:
    det = result.detector
    out = {f"model.{k}": v for k, v in det.model.cfg.to_dict().items()}
    out.update({f"train.{k}": v for k, v in det.info.get("train_config", {}).items()})
    out.update({f"sensors.{t}": ",".join(names) for t, names in det.sensors.items()})
    out.update(dict(extra or {}))
    return {k: str(v) for k, v in out.items()}


def log_training(result: TrainResult, *, model_name: str | None, tracking_uri: str = DEFAULT_TRACKING_URI,
                 experiment: str | None = None, artifact_location: str | None = None, run_name: str | None = None,
                 params: Mapping[str, Any] | None = None, ingest_report: str | Path | None = None,
                 evaluation: Mapping[str, pl.DataFrame] | None = None, plots: Mapping[str, Any] | None = None,
                 tags: Mapping[str, str] | None = None) -> LoggedRun:
    """Log a training run and, when ``model_name`` is given, register its detector as the new ``challenger``.

    evaluation: name -> polars table (logged as CSV under evaluation/); plots: name -> image path or matplotlib
    figure (under plots/). ``artifact_location`` (a folder) applies when the experiment is created.
    """
    mlflow = _mlflow(tracking_uri)
    client = _client(tracking_uri)
    exp_id = _experiment_id(client, experiment or model_name or "rmamba", artifact_location)
    det = result.detector
    with tempfile.TemporaryDirectory(prefix="rmamba-log-") as tmp_dir:
        tmp = Path(tmp_dir)
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as run:
            mlflow.log_params(_params(result, params))
            # per-epoch curves under epoch/: the plain names hold the final values the promotion gate reads (MLflow
            # reports a metric's value at its largest step, so curves and finals must not share a name)
            for row in result.history.iter_rows(named=True):
                mlflow.log_metrics(_finite({f"epoch/{k}": row[k] for k in EPOCH_METRICS}), step=int(row["step"]))
            mlflow.log_metrics(_finite(result.metrics))
            mlflow.set_tags({"rmamba.kind": "training", **dict(tags or {})})

            result.history.write_csv(tmp / "history.csv")
            mlflow.log_artifact(str(tmp / "history.csv"), "training")
            if result.data_ranges.height:
                result.data_ranges.write_csv(tmp / "data_ranges.csv")
                mlflow.log_artifact(str(tmp / "data_ranges.csv"), "training")
            mlflow.log_dict({t: u.tolist() for t, u in result.routing_usage.items()}, "training/routing_usage.json")
            mlflow.log_dict(json.loads(json.dumps(det.info, default=str)), "training/detector_info.json")
            if ingest_report is not None:
                mlflow.log_artifact(str(ingest_report), "ingest")
            for name, table in (evaluation or {}).items():
                table.write_csv(tmp / f"{name}.csv")
                mlflow.log_artifact(str(tmp / f"{name}.csv"), "evaluation")
            for name, plot in (plots or {}).items():
                if hasattr(plot, "savefig"):
                    mlflow.log_figure(plot, f"plots/{name}.png")
                else:
                    mlflow.log_artifact(str(plot), "plots")

            folder = det.save(tmp / "detector")
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(PYFUNC_FILE),
                artifacts={"detector": str(folder)},
                code_paths=stage_code(tmp / "code"),
                pip_requirements=pip_requirements(),
                signature=model_signature(det),
                input_example=input_example(det),
                registered_model_name=model_name,
            )
        version = None
        if model_name:
            version = str(info.registered_model_version)
            client.set_registered_model_alias(model_name, CHALLENGER, version)
            for key in ("val_nll", "train_nll", "steps"):
                if key in result.metrics and math.isfinite(result.metrics[key]):
                    client.set_model_version_tag(model_name, version, key, str(result.metrics[key]))
    return LoggedRun(run.info.run_id, exp_id, info.model_uri, model_name, version)


@dataclass
class PromotionDecision:
    """The promotion gate's decision and the numbers it was made on."""

    model_name: str
    metric: str
    promoted: bool
    reason: str
    challenger_version: str
    champion_version: str | None     # the champion before the decision (None: there was none)
    challenger_value: float | None
    champion_value: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _run_metric(client: Any, version: Any, metric: str) -> float | None:
    if not version.run_id:
        return None
    value = client.get_run(version.run_id).data.metrics.get(metric)
    return float(value) if value is not None and math.isfinite(value) else None


def promote(model_name: str, *, tracking_uri: str = DEFAULT_TRACKING_URI, metric: str = "val_nll",
            higher_is_better: bool = False, experiment: str | None = None) -> PromotionDecision:
    """Move ``champion`` to the ``challenger`` version when it is at least as good on ``metric`` (read from the
    versions' training runs), or when there is no champion yet. Returns the decision; it is also set as tags on
    the challenger version and the registered model, and logged as a run in ``experiment`` (default: the model's
    name)."""
    mlflow = _mlflow(tracking_uri)
    client = _client(tracking_uri)
    if not client.search_registered_models(filter_string=f"name = '{model_name}'"):
        raise ValueError(f"model_name: no registered model {model_name!r} at {tracking_uri} (train first)")
    challenger = _alias(client, model_name, CHALLENGER)
    if challenger is None:
        raise ValueError(f"model {model_name!r}: no version has the alias {CHALLENGER!r} (train first)")
    champion = _alias(client, model_name, CHAMPION)
    c_val = _run_metric(client, challenger, metric)
    h_val = _run_metric(client, champion, metric) if champion is not None else None
    better = "higher" if higher_is_better else "lower"
    if champion is None:
        promoted, reason = True, "no champion yet"
    elif champion.version == challenger.version:
        promoted, reason = False, f"version {challenger.version} is already the champion"
    elif c_val is None:
        promoted, reason = False, f"the challenger has no {metric} metric"
    elif h_val is None:
        promoted, reason = True, f"the champion has no {metric} metric"
    elif (c_val >= h_val) if higher_is_better else (c_val <= h_val):
        promoted, reason = True, f"challenger {metric} {c_val:.6g} is at least as good as champion's {h_val:.6g} " \
                                 f"({better} is better)"
    else:
        promoted, reason = False, f"challenger {metric} {c_val:.6g} is worse than champion's {h_val:.6g} " \
                                  f"({better} is better)"
    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION, challenger.version)
    decision = PromotionDecision(model_name, metric, promoted, reason, str(challenger.version),
                                 None if champion is None else str(champion.version), c_val, h_val)

    verdict = "promoted" if promoted else "kept"
    client.set_model_version_tag(model_name, challenger.version, "promotion.decision", verdict)
    client.set_model_version_tag(model_name, challenger.version, "promotion.reason", reason)
    client.set_registered_model_tag(model_name, "last_promotion", json.dumps(decision.to_dict()))
    exp_id = _experiment_id(client, experiment or model_name, None)
    with mlflow.start_run(experiment_id=exp_id, run_name=f"promotion v{challenger.version}"):
        mlflow.set_tags({"rmamba.kind": "promotion", "promotion.decision": verdict, "promotion.reason": reason})
        mlflow.log_params({"model_name": model_name, "metric": metric, "challenger_version": challenger.version,
                           "champion_version": decision.champion_version, "higher_is_better": higher_is_better})
        mlflow.log_metrics(_finite({"challenger_value": c_val, "champion_value": h_val, "promoted": float(promoted)}))
    return decision


def model_uri(model_name: str, alias: str = CHAMPION) -> str:
    return f"models:/{model_name}@{alias}"


def load_pyfunc(model_name: str, *, tracking_uri: str = DEFAULT_TRACKING_URI, alias: str = CHAMPION) -> Any:
    """The registered model as an MLflow pyfunc (predict on pandas or polars frames)."""
    mlflow = _mlflow(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri(model_name, alias))


def load_detector(model_name: str, *, tracking_uri: str = DEFAULT_TRACKING_URI, alias: str = CHAMPION,
                  dst: str | Path | None = None) -> RoMDetector:
    """The registered `RoMDetector` itself (for streaming scoring with carried state), downloaded to ``dst``."""
    from pipelines.detector import RoMDetector

    mlflow = _mlflow(tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri(model_name, alias),
                                                dst_path=None if dst is None else str(dst))
    return RoMDetector.load(Path(local) / "artifacts" / "detector")


def alias_versions(model_name: str, *, tracking_uri: str = DEFAULT_TRACKING_URI) -> dict[str, str]:
    """{alias: version} of a registered model (empty when it is not registered)."""
    client = _client(tracking_uri)
    found = client.search_registered_models(filter_string=f"name = '{model_name}'")
    return {a: str(v) for a, v in found[0].aliases.items()} if found else {}


__all__ = ["CHALLENGER", "CHAMPION", "LoggedRun", "PromotionDecision", "alias_versions", "input_example",
           "load_detector", "load_pyfunc", "log_training", "model_signature", "model_uri", "pip_requirements",
           "promote", "stage_code"]
