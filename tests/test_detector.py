"""The detector bundle: chunked scoring equals one pass, state round-trips, save/load keeps scores."""

import numpy as np
import pytest
import torch

from pipelines.detector import RobustScaler, RoMDetector, state_from_bytes, state_to_bytes
from rmamba import RoMConfig, RoMForecaster


def _detector(seed: int = 0) -> RoMDetector:
    torch.manual_seed(seed)
    cfg = RoMConfig(d_model=16, n_layers=2, num_experts=4, top_k=1)
    model = RoMForecaster(cfg, {"pump": 3, "fan": 2})
    rng = np.random.default_rng(seed)
    scalers = {"pump": RobustScaler.fit(rng.normal(5, 2, (200, 3))),
               "fan": RobustScaler.fit(rng.normal(0, 1, (200, 2)))}
    return RoMDetector(model, {"pump": ["a", "b", "c"], "fan": ["x", "y"]}, scalers, {"pump": 5.0, "fan": 4.0})


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
