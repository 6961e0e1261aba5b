"""Registry edge on a temporary SQLite tracking store: log, register as challenger, the promotion gate, the pyfunc
back on pandas and polars frames; and the CLI end to end (generate -> ingest -> train -> promote)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch

from pipelines import registry
from pipelines.train import TrainConfig, TrainResult, train_detector
from rmamba import RoMConfig

ROOT = Path(__file__).resolve().parent.parent
NAME = "plant-detector"


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def db_template(tmp_path_factory) -> Path:
    """An initialised tracking database (creating the tables takes seconds): each test gets a copy."""
    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    assert registry.alias_versions(NAME, tracking_uri=f"sqlite:///{path}") == {}
    return path


@pytest.fixture
def tracking(tmp_path, db_template) -> str:
    db = tmp_path / "mlflow.db"
    shutil.copy(db_template, db)
    return f"sqlite:///{db}"


@pytest.fixture(scope="module")
def trained() -> TrainResult:
    rng = np.random.default_rng(0)
    t = np.arange(300)
    pump = np.stack([50 + 10 * np.sin(t / 8), 3 + np.cos(t / 8), rng.normal(60, 1, t.size)], 1)
    fan = np.stack([1500 + 100 * np.sin(t / 5), rng.normal(2, 0.1, t.size)], 1)
    cfg = TrainConfig(window=32, batch_size=2, steps=4, steps_per_epoch=2, warmup_steps=1, threshold_method="quantile",
                      threshold_q=0.05)
    sensors = {"pump": ["flow", "pressure", "temp"], "fan": ["speed", "vib"]}
    return train_detector({"pump": [pump], "fan": [fan]}, sensors,
                          RoMConfig(d_model=8, n_layers=1, d_state=4, num_experts=2), cfg)


def with_val_nll(result: TrainResult, value: float) -> TrainResult:
    return replace(result, metrics={**result.metrics, "val_nll": value})


def pump_frame(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    t = np.arange(n)
    return pd.DataFrame({
        "timestamp": pd.date_range("2026-03-01", periods=n, freq="min", tz="UTC"),
        "equipment_type": "pump",
        "flow": 50 + 10 * np.sin(t / 8), "pressure": 3 + np.cos(t / 8), "temp": rng.normal(60, 1, n),
    })


def test_log_register_promotion_gate_and_pyfunc_round_trip(tracking, trained, tmp_path):
    from mlflow import MlflowClient

    report = tmp_path / "ingest-report.json"
    report.write_text(json.dumps({"rows": 10}))
    plot = tmp_path / "loss.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n")
    art = tmp_path / "artifacts"
    base = trained.metrics["val_nll"]
    first = registry.log_training(with_val_nll(trained, base), tracking_uri=tracking, model_name=NAME,
                                  artifact_location=str(art), ingest_report=report, plots={"loss": plot},
                                  evaluation={"per_kind": pl.DataFrame({"kind": ["spike"], "f1": [0.5]})})
    assert first.version == "1" and registry.alias_versions(NAME, tracking_uri=tracking) == {"challenger": "1"}
    client = MlflowClient(tracking)
    run = client.get_run(first.run_id)
    assert run.data.params["model.d_model"] == "8" and run.data.params["sensors.fan"] == "speed,vib"
    assert len(client.get_metric_history(first.run_id, "epoch/val_nll")) == trained.history.height
    assert run.data.metrics["val_nll"] == pytest.approx(base)
    logged = {f.path for d in ("ingest", "evaluation", "plots", "training")
              for f in client.list_artifacts(first.run_id, d)}
    assert {"ingest/ingest-report.json", "evaluation/per_kind.csv", "plots/loss.png", "training/history.csv"} <= logged
    assert str(art) in client.get_experiment(first.experiment_id).artifact_location

    d = registry.promote(NAME, tracking_uri=tracking)
    assert d.promoted and d.reason == "no champion yet" and d.champion_version is None

    # a worse challenger does not move the champion; the decision and its numbers are recorded
    registry.log_training(with_val_nll(trained, base + 1.0), tracking_uri=tracking, model_name=NAME)
    d = registry.promote(NAME, tracking_uri=tracking)
    assert not d.promoted and (d.challenger_version, d.champion_version) == ("2", "1")
    assert d.challenger_value == pytest.approx(base + 1) and d.champion_value == pytest.approx(base)
    assert registry.alias_versions(NAME, tracking_uri=tracking) == {"challenger": "2", "champion": "1"}
    assert client.get_model_version(NAME, "2").tags["promotion.decision"] == "kept"
    assert json.loads(client.get_registered_model(NAME).tags["last_promotion"])["promoted"] is False

    # a better one does
    registry.log_training(with_val_nll(trained, base - 1.0), tracking_uri=tracking, model_name=NAME)
    d = registry.promote(NAME, tracking_uri=tracking)
    assert d.promoted and (d.challenger_version, d.champion_version) == ("3", "1")
    assert registry.alias_versions(NAME, tracking_uri=tracking) == {"challenger": "3", "champion": "3"}
    runs = client.search_runs([first.experiment_id], "tags.`rmamba.kind` = 'promotion'")
    assert sorted(r.data.tags["promotion.decision"] for r in runs) == ["kept", "promoted", "promoted"]

    # the champion back as a pyfunc scores pandas and polars frames like the detector itself
    model = registry.load_pyfunc(NAME, tracking_uri=tracking)
    frame = pump_frame()
    out = model.predict(frame)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == ["timestamp", "equipment_type", "score", "flag", "attr__flow", "attr__pressure",
                                 "attr__temp"]
    expected = trained.detector.score(frame[["flow", "pressure", "temp"]].to_numpy(), "pump").score
    np.testing.assert_allclose(out["score"].to_numpy(), expected, rtol=1e-5)
    assert out["flag"].to_numpy().tolist() == (np.nan_to_num(expected, nan=-np.inf)
                                               > trained.detector.threshold_["pump"]).tolist()
    out_pl = model.predict(pl.from_pandas(frame.drop(columns="equipment_type")), params={"equipment_type": "pump"})
    assert isinstance(out_pl, pl.DataFrame)
    np.testing.assert_allclose(out_pl["score"].to_numpy(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match=r"missing from the data: \['temp'\]"):
        model.predict(frame.drop(columns="temp"))
    # and as a RoMDetector for streaming
    det = registry.load_detector(NAME, tracking_uri=tracking, dst=tmp_path / "dl")
    assert det.threshold_ == trained.detector.threshold_


def test_score_frame_reads_missing_flags_sorts_by_time_and_splits_equipment(trained):
    det = trained.detector
    base = pl.from_pandas(pump_frame(30))
    flagged = base.with_columns(pl.lit(False).alias("flow__missing"), pl.lit(False).alias("temp__missing"))
    flagged = flagged.with_columns(pl.when(pl.int_range(30) == 10).then(True).otherwise(False).alias("flow__missing"))
    out = det.score_frame(flagged)
    ref = base.to_pandas()
    values = ref[["flow", "pressure", "temp"]].to_numpy().copy()
    values[10, 0] = np.nan  # flagged missing: unobserved even though a (forward-filled) value is present
    np.testing.assert_allclose(out["score"].to_numpy(), det.score(values, "pump").score, rtol=1e-6)
    assert out["attr__flow"][10] == 0.0 and out["attr__pressure"][10] > 0
    # rows come back in time order; two equipment are scored separately, each from a fresh state
    shuffled = pl.concat([base.with_columns(pl.lit("P-1").alias("equipment")),
                          base.with_columns(pl.lit("P-2").alias("equipment"))]).sample(fraction=1.0, seed=1,
                                                                                      shuffle=True)
    both = det.score_frame(shuffled)
    assert both["equipment"].to_list() == ["P-1"] * 30 + ["P-2"] * 30 or both["equipment"].to_list() == [
        "P-2"] * 30 + ["P-1"] * 30
    for eq in ("P-1", "P-2"):
        part = both.filter(pl.col("equipment") == eq)
        assert part["timestamp"].is_sorted()
        np.testing.assert_allclose(part["score"].to_numpy(), det.score_frame(base)["score"].to_numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="expected exactly one type per frame"):
        det.score_frame(pl.concat([base, base.with_columns(pl.lit("fan").alias("equipment_type"))]))


def test_promote_without_a_challenger_is_an_error(tracking):
    with pytest.raises(ValueError, match="no registered model 'nobody'"):
        registry.promote("nobody", tracking_uri=tracking)


# ---- end to end through the CLI ---------------------------------------------------------------------------------
def test_cli_generate_ingest_train_promote(tmp_path, db_template, capsys):
    from app.cli import main

    plant = tmp_path / "plant"
    assert main(["generate", "--out", str(plant), "--days", "2"]) == 0
    toml = plant / "plant.toml"
    text = toml.read_text()
    train_end = tomllib.loads(text)["train"]["train_until"].rstrip("Z")  # the generator's clean period
    text = re.sub(r"\n\[train\]\n(?:[^\[\n][^\n]*\n?)*", "\n", text)  # replaced by a tiny [train] below
    db = tmp_path / "mlflow.db"
    shutil.copy(db_template, db)
    text = re.sub(r'mlflow_tracking_uri = ".*"', f'mlflow_tracking_uri = "sqlite:///{db}"', text)
    text += (f"\n[train]\nwindow = 64\nbatch_size = 2\nsteps = 50\nsteps_per_epoch = 2\nwarmup_steps = 1\n"
             f"train_until = {train_end}Z\nthreshold_method = \"quantile\"\n")
    toml.write_text(text)
    assert main(["ingest", "--config", str(toml), "--no-progress"]) == 0
    capsys.readouterr()

    assert main(["train", "--config", str(toml), "--max-steps", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "trained 4 steps (2 epochs" in out and "validation NLL" in out
    assert re.search(r"thresholds \(quantile, q=0.001\): pump [\d.]+, compressor [\d.]+, conveyor [\d.]+", out)
    assert re.search(r"^  compressor\s+\[[\d. ]+\]\s+\[[\d. ]+\]$", out, re.M)  # usage of 4 experts, 2 layers
    assert "registered synthetic-plant-detector version 1 as 'challenger'" in out
    assert "promotion: 'champion' -> version 1 (no champion yet)" in out
    assert (plant / "checkpoints" / "train" / "last.pt").exists()

    assert main(["promote", "--config", str(toml)]) == 0
    assert "'champion' stays version 1" in capsys.readouterr().out

    # --resume continues from the finished run's checkpoint: nothing left to train, same result
    assert main(["train", "--config", str(toml), "--max-steps", "4", "--resume", "--no-register", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "trained 4 steps (2 epochs" in out and "detector saved to" in out and "registered" not in out

    # the registered model loads in a fresh interpreter, elsewhere, from the code logged with it
    probe = ("import mlflow, sys; import pandas as pd; mlflow.set_tracking_uri(sys.argv[1]); "
             "m = mlflow.pyfunc.load_model('models:/synthetic-plant-detector@champion'); "
             "import rmamba, pipelines.detector; print(rmamba.__file__); print(pipelines.detector.__file__)")
    done = subprocess.run([sys.executable, "-c", probe, f"sqlite:///{db}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"MLFLOW_DISABLE_TELEMETRY": "true", "PATH": "/usr/bin"})
    assert done.returncode == 0, done.stderr
    files = done.stdout.split()
    assert all("/artifacts/code/" in f and not f.startswith(str(ROOT)) for f in files), files
