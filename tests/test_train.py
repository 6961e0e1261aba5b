"""Training: config validation, CPU determinism, checkpoint/resume equality, weight-decay groups, a toy that learns,
early stopping, thresholds from the held-back period only, and the store stage (train_until, __missing flags)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pytest
import torch

from pipelines.config import EquipmentType, SensorConfig
from pipelines.detector import RoMDetector
from pipelines.ingest.store import partition_file, store_schema, write_months
from pipelines.thresholds import fit_threshold
from pipelines.train import (
    CHECKPOINT_FILE,
    TrainConfig,
    frames_to_series,
    load_training_frames,
    lr_factor,
    param_groups,
    train_detector,
)
from rmamba import RoMConfig, RoMForecaster

SENSORS = {"pump": ["flow", "pressure", "temp"], "fan": ["speed", "vib"]}
TINY = RoMConfig(d_model=8, n_layers=1, d_state=4, num_experts=2, top_k=1)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, kinder to a shared machine, and keeps runs comparable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def toy_series(T: int = 400, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Smooth periodic signals with a little noise and a few missing values, in physical units."""
    rng = np.random.default_rng(seed)
    t = np.arange(T)
    pump = np.stack([50 + 10 * np.sin(t / 8), 3 + np.cos(t / 8), 60 + 0.01 * t], 1)
    pump = pump + rng.normal(0, 0.05, pump.shape) * [10, 1, 1]
    pump[rng.random(pump.shape) < 0.05] = np.nan
    fan = np.stack([1500 + 100 * np.sin(t / 5), 2 + 0.5 * np.sin(t / 5 + 1)], 1) + rng.normal(0, 0.02, (T, 2))
    return {"pump": [pump, pump[::-1].copy()], "fan": [fan]}


def cfg(**kw) -> TrainConfig:
    base = dict(window=32, batch_size=2, steps=6, steps_per_epoch=2, warmup_steps=2, lr=1e-2, patience=0,
                val_fraction=0.25, score_chunk=64)
    return TrainConfig(**{**base, **kw})


def weights(det: RoMDetector) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in det.model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- config ---------------------------------------------------------------------------------------------------
def test_config_from_table_and_errors_name_key_expected_found():
    c = TrainConfig.from_dict({"window": 4096, "lr": 1, "train_until": "2026-03-20T06:00:00+01:00"})
    assert c.window == 4096 and c.lr == 1.0 and isinstance(c.lr, float)
    assert c.train_until == datetime(2026, 3, 20, 5, tzinfo=UTC)
    assert TrainConfig.from_dict({"train_until": datetime(2026, 3, 20)}).train_until.tzinfo is UTC  # TOML datetime
    assert TrainConfig.from_dict({"train_until": date(2026, 3, 20)}).train_until == datetime(2026, 3, 20, tzinfo=UTC)
    assert c.to_dict()["train_until"] == "2026-03-20T05:00:00+00:00"
    with pytest.raises(ValueError, match=r"train\.window: expected an integer in \[16, 16384\], got 32768"):
        TrainConfig.from_dict({"window": 32768})
    with pytest.raises(ValueError, match=r"train\.batch_size: expected an integer >= 1, got '4'"):
        TrainConfig.from_dict({"batch_size": "4"})
    with pytest.raises(ValueError, match=r"train\.val_fraction: expected a number in \(0, 1\), got 1.0"):
        TrainConfig.from_dict({"val_fraction": 1.0})
    with pytest.raises(ValueError, match=r"train\.train_until: expected an ISO 8601 timestamp.*got 'yesterday'"):
        TrainConfig.from_dict({"train_until": "yesterday"})
    with pytest.raises(ValueError, match=r"train\.threshold_method: expected 'pot' or 'quantile', got 'max'"):
        TrainConfig.from_dict({"threshold_method": "max"})
    with pytest.raises(ValueError, match=r"train\.patience: expected an integer >= 0.*got True"):
        TrainConfig.from_dict({"patience": True})
    with pytest.raises(ValueError, match=r"train\.epochs: unknown key \(expected one of: window, batch_size"):
        TrainConfig.from_dict({"epochs": 3})


def test_schedule_warms_up_then_decays_to_min_ratio():
    c = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, c) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(100, c) == pytest.approx(0.1)


def test_no_weight_decay_on_A_log_D_norms_biases_embeddings():
    model = RoMForecaster(TINY, {"pump": 3, "fan": 2})
    decay, plain = param_groups(model, 0.1)
    assert plain["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    names = set(plain["names"])
    assert {"backbone.layers.0.mixer.ssm.A_log", "backbone.layers.0.mixer.ssm.D", "backbone.layers.0.norm.weight",
            "backbone.norm_f.weight", "type_embedding.weight", "adapters.pump.bias", "heads.fan.bias",
            "backbone.layers.0.mixer.ssm.dt_proj.bias", "backbone.layers.0.mixer.ssm.conv1d.bias"} <= names
    assert {"backbone.layers.0.mixer.w_in", "backbone.layers.0.mixer.w_out", "backbone.layers.0.mixer.router.weight",
            "adapters.pump.weight", "heads.fan.weight", "backbone.layers.0.mixer.ssm.x_proj.weight"} <= set(
        decay["names"])
    assert len(names) + len(decay["names"]) == len(list(model.parameters()))


# ---- the loop ---------------------------------------------------------------------------------------------------
def test_cpu_training_is_deterministic_for_a_seed(tmp_path):
    data = toy_series()
    a = train_detector(data, SENSORS, TINY, cfg(seed=3, checkpoint_dir=str(tmp_path / "a")))
    b = train_detector(data, SENSORS, TINY, cfg(seed=3))
    c = train_detector(data, SENSORS, TINY, cfg(seed=4))
    assert_same_weights(weights(a.detector), weights(b.detector))
    assert a.history["val_nll"].to_list() == b.history["val_nll"].to_list()
    assert a.detector.threshold_ == b.detector.threshold_
    assert not torch.equal(weights(a.detector)["heads.pump.weight"], weights(c.detector)["heads.pump.weight"])
    # the optimizer really used the groups: A_log, D, norms ... without decay
    ck = torch.load(tmp_path / "a" / CHECKPOINT_FILE, weights_only=True)
    groups = ck["optimizer"]["param_groups"]
    assert groups[1]["weight_decay"] == 0.0 and "backbone.layers.0.mixer.ssm.A_log" in groups[1]["names"]
    assert groups[0]["weight_decay"] == pytest.approx(0.05)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    data = toy_series()
    c = cfg(steps=8, steps_per_epoch=3, checkpoint_every=4, patience=5, checkpoint_dir=str(tmp_path / "ck"))
    straight = train_detector(data, SENSORS, TINY, replace(c, checkpoint_dir=str(tmp_path / "straight")))

    def crash(step: int, loss: float) -> None:
        if step == 4:
            raise KeyboardInterrupt("simulated crash after the step-4 checkpoint")

    with pytest.raises(KeyboardInterrupt):
        train_detector(data, SENSORS, TINY, c, on_step=crash)
    assert (tmp_path / "ck" / CHECKPOINT_FILE).exists()
    resumed = train_detector(data, SENSORS, TINY, c, resume=True)
    assert resumed.detector.info["resumed_from_step"] == 4
    assert_same_weights(weights(straight.detector), weights(resumed.detector))
    assert straight.history["val_nll"].to_list() == resumed.history["val_nll"].to_list()
    assert straight.history["train_nll"].to_list() == resumed.history["train_nll"].to_list()
    assert straight.detector.threshold_ == resumed.detector.threshold_
    # a changed config is refused, naming the key
    with pytest.raises(ValueError, match=r"checkpoint: train\.lr was 0\.01 .* now 0\.02"):
        train_detector(data, SENSORS, TINY, replace(c, lr=0.02), resume=True)


def test_loss_falls_on_a_toy():
    res = train_detector(toy_series(600), SENSORS, replace(TINY, d_model=16),
                         cfg(window=64, batch_size=4, steps=40, steps_per_epoch=10, warmup_steps=4, lr=2e-2))
    val = res.history["val_nll"].to_list()
    train = res.history["train_nll"].to_list()
    assert val[-1] < val[0] - 0.3 and train[-1] < train[0] - 0.3, (train, val)
    assert res.metrics["val_nll"] == pytest.approx(min(val))  # the best epoch's weights are kept
    assert set(res.routing_usage) == {"pump", "fan"} and res.routing_usage["pump"].shape == (1, 2)
    np.testing.assert_allclose(res.routing_usage["fan"].sum(1), 1.0)
    assert {"epoch", "step", "train_nll", "aux_loss", "val_nll", "lr", "seconds", "tokens_per_s"} <= set(
        res.history.columns)


def test_novelty_part_stays_up_through_a_sustained_shift():
    """The reason for the novelty part: through a long level shift the features stay far from the training ones
    (the novelty part stays well above everything seen on held-back normal data), so the alarm holds to the end."""
    res = train_detector(toy_series(600), SENSORS, replace(TINY, d_model=16),
                         cfg(window=64, batch_size=4, steps=40, steps_per_epoch=10, warmup_steps=4, lr=2e-2))
    det = res.detector
    assert set(det.novelty_) == {"pump", "fan"}
    m = det.novelty_["pump"]
    x = toy_series(900, seed=7)["pump"][0]
    x[500:800, 1] += 3.0  # pressure: +3 bar (its normal swing is +-1) for 300 steps
    r = det.score(x, "pump")
    val_novelty = (res.val_novelty["pump"] - m.novelty_center_) / m.novelty_scale_
    late = slice(650, 800)  # the second half of the shift
    z_nov = (r.novelty[late] - m.novelty_center_) / m.novelty_scale_
    assert np.nanmedian(z_nov) > np.max(val_novelty), (np.nanmedian(z_nov), np.max(val_novelty))
    # flagged share late in the shift: the combined score vs surprise alone under the same threshold rule
    surprise_only = np.nan_to_num(r.surprise[late]) > fit_threshold(res.val_surprise["pump"], "pot", 1e-3)
    combined = det.flags(r.score[late], "pump")
    assert combined.mean() > 0.5 and combined.mean() > surprise_only.mean() + 0.3, (combined.mean(),
                                                                                   surprise_only.mean())
    assert det.flags(r.score[300:500], "pump").mean() < 0.05  # normal steps before the shift


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    # min_delta so large that no epoch after the first counts as an improvement
    res = train_detector(toy_series(), SENSORS, TINY, cfg(steps=40, steps_per_epoch=2, patience=2, min_delta=1e9))
    assert res.history.height == 3 and res.metrics["steps"] == 6
    assert res.metrics["stopped_early"] == 1.0 and res.metrics["best_epoch"] == 1.0


def test_scalers_and_thresholds_use_only_their_own_split():
    rng = np.random.default_rng(1)
    T, n_val = 200, 50
    x = rng.normal(0, 1, (T, 2))
    x[-n_val:] *= 4  # the held-back period is wider than the training period
    x[:, 0] += 10
    res = train_detector({"fan": [x]}, {"fan": ["speed", "vib"]}, TINY,
                         cfg(window=256, val_fraction=0.25, threshold_method="quantile", threshold_q=0.1))
    det = res.detector
    # scaler: training part only
    np.testing.assert_allclose(det.scalers_["fan"].median_, np.median(x[:-n_val], axis=0))
    # validation scores = the last 50 steps of scoring the whole series with carried state (warm-up covers the rest)
    full = det.score(x, "fan").score
    assert res.val_scores["fan"].shape == (n_val,)
    np.testing.assert_allclose(res.val_scores["fan"], full[-n_val:], rtol=1e-5)
    assert det.threshold_["fan"] == pytest.approx(fit_threshold(full[-n_val:], "quantile", q=0.1), rel=1e-5)
    assert det.threshold_["fan"] != pytest.approx(fit_threshold(full[1:-n_val], "quantile", q=0.1), rel=1e-3)
    assert det.info["val_steps"] == {"fan": n_val}


def test_input_errors_are_named():
    with pytest.raises(ValueError, match=r"series\.pump\[0\]: expected values of shape \(time, 3\)"):
        train_detector({"pump": [np.zeros((50, 2))]}, SENSORS, TINY, cfg())
    with pytest.raises(ValueError, match="no sensor list for equipment type 'boiler'"):
        train_detector({"boiler": [np.zeros((50, 2))]}, SENSORS, TINY, cfg())


# ---- the store stage -----------------------------------------------------------------------------------------
def write_store(root, etype: EquipmentType, eq: str, start: datetime, minutes: int) -> pl.DataFrame:
    ts = [start + timedelta(minutes=i) for i in range(minutes)]
    t = np.arange(minutes)
    df = pl.DataFrame({"timestamp": ts, "a": 5 + np.sin(t / 7), "b": 1.0 + 0.1 * np.cos(t / 3),
                       "a__missing": t % 50 == 7, "b__missing": np.zeros(minutes, dtype=bool)})
    df = df.with_columns(pl.col("timestamp").dt.cast_time_unit("us")).select(list(store_schema(etype)))
    write_months(df, lambda m: partition_file(root, etype.name, eq, m))
    return df


def test_store_stage_respects_train_until_missing_flags_and_holds_back_the_end_in_time(tmp_path):
    etype = EquipmentType("pump", (SensorConfig("a"), SensorConfig("b")))
    start = datetime(2026, 2, 28, 22, tzinfo=UTC)
    write_store(tmp_path, etype, "P-1", start, 600)  # crosses into March: two month files
    until = start + timedelta(minutes=399)
    frames = load_training_frames(tmp_path, {"pump": etype, "fan": etype}, until)
    assert list(frames) == ["pump"] and frames["pump"]["P-1"].height == 400
    assert frames["pump"]["P-1"]["timestamp"].max() == until
    c = TrainConfig(window=64, val_fraction=0.25)
    train, val, ranges = frames_to_series(frames, {"pump": etype}, c)
    (tr,), (va,) = train["pump"], val["pump"]
    assert len(tr) == 300 and len(va) - va.warmup == 100 and va.warmup == 64
    np.testing.assert_array_equal(va.values[:64], tr.values[-64:])  # warm-up = the training steps just before
    assert np.isnan(tr.values[7, 0]) and not tr.observed()[57, 0] and tr.observed()[8, 0]  # __missing -> unobserved
    row = ranges.row(0, named=True)
    assert row["train_end"] < row["val_start"] and row["val_end"] == until and row["train_steps"] == 300


def test_a_long_gap_splits_series_and_short_gaps_become_unobserved_steps(tmp_path):
    etype = EquipmentType("pump", (SensorConfig("a"), SensorConfig("b")))
    df = write_store(tmp_path, etype, "P-1", datetime(2026, 3, 1, tzinfo=UTC), 400)
    short = df.filter((pl.col("timestamp").dt.minute() != 5) | (pl.col("timestamp").dt.hour() != 1))  # 1 step gap
    gapped = short.filter((pl.col("timestamp") < datetime(2026, 3, 1, 3, tzinfo=UTC))
                          | (pl.col("timestamp") >= datetime(2026, 3, 1, 5, tzinfo=UTC)))  # 120-step gap
    train, val, _ = frames_to_series({"pump": {"P-1": gapped}}, {"pump": etype},
                                     TrainConfig(window=32, val_fraction=0.2))
    lengths = [len(s) for s in train["pump"]]
    assert lengths[0] == 180 and not train["pump"][0].observed()[65].any()  # 01:05 filled as unobserved
    assert [s.name for s in train["pump"]] == ["P-1#0", "P-1#1"] and len(val["pump"]) == 1


def test_a_non_finite_loss_stops_training_with_a_named_error_and_no_checkpoint(tmp_path, monkeypatch):
    """The model runs the scan without its NaN checks on a GPU, so a diverged run is caught at the loss: a clear
    error naming the step and the settings to change, raised before the step's checkpoint is written."""
    from rmamba.forecaster import ForecastOutput

    real = ForecastOutput.forecast_loss
    calls = []

    def loss(self):
        calls.append(1)
        value = real(self)
        return value * float("nan") if len(calls) > 3 else value   # steps 1-3 fine, then NaN

    monkeypatch.setattr(ForecastOutput, "forecast_loss", loss)
    c = cfg(steps=6, checkpoint_every=1, checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"training step \d+: the loss is not finite .* lower train\.lr"):
        train_detector(toy_series(), SENSORS, TINY, c)
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    state = json.loads(saved["state"])
    assert 1 <= state["step"] < 6
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
