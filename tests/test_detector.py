"""The detector bundle: chunked scoring equals one pass, state round-trips, save/load keeps scores, the novelty
part of the score."""

import numpy as np
import pytest
import torch

from pipelines.detector import (
    FeatureMoments,
    NoveltyModel,
    RobustScaler,
    RoMDetector,
    state_from_bytes,
    state_to_bytes,
)
from rmamba import RoMConfig, RoMForecaster


def _detector(seed: int = 0) -> RoMDetector:
    torch.manual_seed(seed)
    cfg = RoMConfig(d_model=16, n_layers=2, num_experts=4, top_k=1)
    model = RoMForecaster(cfg, {"pump": 3, "fan": 2})
    rng = np.random.default_rng(seed)
    scalers = {"pump": RobustScaler.fit(rng.normal(5, 2, (200, 3))),
               "fan": RobustScaler.fit(rng.normal(0, 1, (200, 2)))}
    det = RoMDetector(model, {"pump": ["a", "b", "c"], "fan": ["x", "y"]}, scalers, {"pump": 5.0, "fan": 4.0})
    # the pump gets a novelty part (fitted and calibrated on other data); the fan scores surprise alone
    det.novelty_["pump"] = NoveltyModel.fit(det.feature_moments(_values(400, seed=3), "pump", skip=20))
    r = det.score(_values(200, seed=4), "pump")
    det.novelty_["pump"].calibrate(r.surprise, r.novelty)
    return det


def _values(L: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(5, 2, (L, 3))
    v[rng.random((L, 3)) < 0.1] = np.nan
    return v


def test_chunked_scoring_equals_single_pass_and_resumes():
    det = _detector()
    v = _values(300)
    full = det.score(v, "pump", chunk_len=1000)
    chunked = det.score(v, "pump", chunk_len=37)
    np.testing.assert_allclose(chunked.score, full.score, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunked.attribution, full.attribution, rtol=1e-5, atol=1e-5)
    assert np.array_equal(chunked.top_experts, full.top_experts)
    assert full.top_experts.shape == (2, 300, 1)
    # resume from a serialised state: day 1 then day 2 equals both days at once
    first = det.score(v[:120], "pump")
    state = state_from_bytes(state_to_bytes(first.state))
    second = det.score(v[120:], "pump", state=state)
    np.testing.assert_allclose(np.concatenate([first.score, second.score]), full.score, rtol=1e-5, atol=1e-5)
    assert np.isnan(full.score[0])  # no forecast exists for the very first step


def test_save_load_round_trip(tmp_path):
    det = _detector()
    v = _values(100)
    before = det.score(v, "pump").score
    det.save(tmp_path / "m")
    loaded = RoMDetector.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.score(v, "pump").score, before, rtol=1e-6)
    assert loaded.threshold_ == {"pump": 5.0, "fan": 4.0}
    assert loaded.flags(np.array([np.nan, 4.0, 6.0]), "pump").tolist() == [False, False, True]


def test_bad_input_is_named():
    det = _detector()
    with pytest.raises(ValueError, match="unknown type 'boiler'"):
        det.score(_values(10), "boiler")
    with pytest.raises(ValueError, match="expected 2 sensor columns"):
        det.score(_values(10), "fan")
    with pytest.raises(ValueError, match=r"missing from the data: \['c'\]"):
        det.check_sensors("pump", ["a", "b"])


def test_robust_scaler_handles_constant_and_empty_columns():
    v = np.column_stack([np.full(50, 3.0), np.full(50, np.nan), np.arange(50.0)])
    s = RobustScaler.fit(v)
    assert s.scale_[0] > 0 and s.median_[1] == 0 and s.scale_[1] == 1
    assert np.isfinite(s.transform(v[:, :])[:, [0, 2]]).all()


def test_feature_moments_accumulate_to_numpy_mean_and_covariance():
    rng = np.random.default_rng(0)
    f = rng.normal(0, 1, (500, 4)) @ rng.normal(0, 1, (4, 4)) + [1, -2, 3, 0]
    m = FeatureMoments(4)
    for part in np.array_split(f, 7):
        m.add(part)
    mean, prec = m.gaussian(ridge=0.0)
    np.testing.assert_allclose(mean, f.mean(0), rtol=1e-10)
    np.testing.assert_allclose(np.linalg.inv(prec), np.cov(f, rowvar=False), rtol=1e-8)
    nov = NoveltyModel(mean, prec).novelty(f)
    d = f - mean
    np.testing.assert_allclose(nov, 0.5 * np.sum(d @ prec * d, axis=1), rtol=1e-10)
    assert NoveltyModel(mean, prec).novelty(mean[None])[0] == 0.0
    with pytest.raises(ValueError, match="at least 2 training steps"):
        FeatureMoments(4).gaussian()


def test_score_is_standardised_surprise_plus_novelty():
    det = _detector()
    v = _values(150, seed=5)
    r = det.score(v, "pump")
    m = det.novelty_["pump"]
    ok = r.scored
    assert ok.sum() > 100 and not ok[0]
    np.testing.assert_allclose(r.surprise[ok], r.attribution[ok].sum(1))
    expected = ((r.surprise - m.surprise_center_) / m.surprise_scale_
                + (r.novelty - m.novelty_center_) / m.novelty_scale_)
    np.testing.assert_allclose(r.score[ok], expected[ok])
    assert np.isnan(r.novelty[0]) and np.isnan(r.score[0])
    # calibration: both parts have median 0 and IQR 1 on the data they were calibrated on
    c = det.score(_values(200, seed=4), "pump")
    for part, center, scale in ((c.surprise, m.surprise_center_, m.surprise_scale_),
                                (c.novelty, m.novelty_center_, m.novelty_scale_)):
        z = (part[np.isfinite(part)] - center) / scale
        q25, q50, q75 = np.percentile(z, [25, 50, 75])
        assert abs(q50) < 1e-9 and abs(q75 - q25 - 1) < 1e-9
    # a type without a novelty model scores surprise alone
    f = det.score(np.random.default_rng(6).normal(0, 1, (50, 2)), "fan")
    assert f.novelty is None and np.array_equal(f.score, f.surprise, equal_nan=True)


def test_detector_saved_by_version_1_loads_and_scores_surprise_alone(tmp_path):
    import json

    det = _detector()
    det.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "detector.json").read_text())
    assert meta["format_version"] == 2 and set(meta["novelty"]) == {"pump"}
    meta["format_version"] = 1
    del meta["novelty"]
    (tmp_path / "m" / "detector.json").write_text(json.dumps(meta))
    old = RoMDetector.load(tmp_path / "m")
    v = _values(80)
    r = old.score(v, "pump")
    assert old.novelty_ == {} and r.novelty is None
    np.testing.assert_allclose(r.score, det.score(v, "pump").surprise, rtol=1e-6)
    meta["format_version"] = 3
    (tmp_path / "m" / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version expected one of"):
        RoMDetector.load(tmp_path / "m")


def test_a_non_finite_forecast_is_an_error_not_silent_nan_scores():
    """On a GPU the scan runs without its NaN checks; a model with non-finite weights must still not score
    quietly (NaN scores would never cross a threshold): the detector names the type and the step."""
    det = _detector()
    with torch.no_grad():
        det.model.heads["pump"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"pump: the model's forecast is not finite at step \d+"):
        det.score(_values(50), "pump")
    det.score(_values(50, seed=2)[:, :2], "fan")        # another type's head is untouched: it still scores
