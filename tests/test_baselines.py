"""pipelines.baselines: detector contract and detection of obvious injected anomalies."""

import numpy as np
import pytest
from sklearn.base import clone

from pipelines.baselines import IForestDetector, PCADetector, RandomDetector
from pipelines.metrics import auc_roc

N_SENSORS = 6


def plant(n: int, seed: int) -> np.ndarray:
    """(n, 6) normal data: 2 latent drivers mixed into 6 correlated sensors plus noise, sensors on varied scales."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(0).normal(size=(2, N_SENSORS))
    X = rng.normal(size=(n, 2)) @ mixing + 0.1 * rng.normal(size=(n, N_SENSORS))
    return X * np.array([1, 10, 100, 0.1, 1, 5]) + np.array([0, 50, 1000, 2, -3, 0])


@pytest.fixture(scope="module")
def data():
    X_train, X_test = plant(3000, seed=1), plant(600, seed=2)
    y = np.zeros(600, int)
    y[300:310] = 1
    # spike of +10 std on every sensor. (IsolationForest scores saturate beyond the training range: a spike on a
    # few correlated sensors scores like rare normal tail points; the correlation-break test below is PCA's.)
    X_test[300:310] += 10 * X_train.std(0)
    return X_train, X_test, y


@pytest.mark.parametrize("make", [PCADetector, lambda: IForestDetector(n_estimators=100)], ids=["pca", "iforest"])
def test_detectors_find_an_obvious_spike(make, data) -> None:
    X_train, X_test, y = data
    det = make().fit(X_train)
    scores = det.decision_function(X_test)
    assert scores.shape == (600,)
    assert scores[y == 1].min() > scores[y == 0].max()  # perfectly separated
    pred = det.predict(X_test)
    assert pred.dtype == np.int8 and set(np.unique(pred)) <= {0, 1}
    assert pred[y == 1].all()
    assert pred[y == 0].mean() < 0.02  # label-free threshold: few false alarms on normal data


def test_pca_finds_a_correlation_break_that_stays_in_range(data) -> None:
    # swap two sensors' standardised values: each stays within its normal range, the correlation breaks (Q)
    X_train, X_test, _ = data
    X = X_test.copy()
    z = (X - X_train.mean(0)) / X_train.std(0)
    y = np.zeros(len(X), int)
    y[100:120] = 1
    z[100:120, [0, 3]] = -z[100:120, [0, 3]]
    X[100:120] = z[100:120] * X_train.std(0) + X_train.mean(0)
    assert np.all(np.abs(z[100:120]) < 5)
    det = PCADetector().fit(X_train)
    assert auc_roc(y, det.decision_function(X)) > 0.95
    assert det.predict(X)[y == 1].mean() > 0.5


def test_pca_score_is_normalised_t2_plus_q(data) -> None:
    X_train, _, _ = data
    det = PCADetector(variance=0.9).fit(X_train)
    t2, spe = det._t2_q(X_train)
    assert np.quantile(t2, 0.99) == pytest.approx(1.0) and np.quantile(spe, 0.99) == pytest.approx(1.0)
    np.testing.assert_allclose(det.decision_function(X_train), t2 + spe)
    assert det.pca_.n_components_ == 2  # two latent drivers explain > 90%


def test_threshold_is_label_free_and_can_use_held_back_data(data) -> None:
    X_train, X_test, _ = data
    a = PCADetector().fit(X_train)
    b = PCADetector().fit(X_train, X_threshold=plant(3000, seed=9))
    assert np.isfinite(a.threshold_) and np.isfinite(b.threshold_)
    assert a.threshold_ != b.threshold_
    q_fit = PCADetector(threshold_method="quantile", q=0.01).fit(X_train)
    assert (q_fit.decision_function(X_train) > q_fit.threshold_).mean() == pytest.approx(0.01, abs=0.002)


def test_seeds_make_scores_reproducible(data) -> None:
    X_train, X_test, _ = data
    f1, f2 = IForestDetector(n_estimators=50).fit(X_train), IForestDetector(n_estimators=50).fit(X_train)
    np.testing.assert_array_equal(f1.decision_function(X_test), f2.decision_function(X_test))
    r = RandomDetector(random_state=3).fit(X_train)
    np.testing.assert_array_equal(r.decision_function(X_test), r.decision_function(X_test))
    other = RandomDetector(random_state=4).fit(X_train).decision_function(X_test)
    assert not np.array_equal(r.decision_function(X_test), other)
    assert 0.99 < r.threshold_ < 1.0  # POT on uniform training scores: about the 1 - 1e-3 quantile


def test_random_detector_is_at_chance(data) -> None:
    X_train, X_test, y = data
    aucs = [auc_roc(y, RandomDetector(random_state=s).fit(X_train).decision_function(X_test)) for s in range(10)]
    assert 0.35 < np.mean(aucs) < 0.65


@pytest.mark.parametrize("cls", [PCADetector, IForestDetector, RandomDetector])
def test_contract_and_input_validation(cls, data) -> None:
    X_train, X_test, _ = data
    det = cls()
    with pytest.raises(RuntimeError, match="not fitted"):
        det.decision_function(X_test)
    assert det.fit(X_train) is det
    assert det.n_features_in_ == N_SENSORS and hasattr(det, "threshold_")
    assert clone(det).get_params() == det.get_params()
    with pytest.raises(ValueError, match="reshape"):
        det.decision_function(X_test[:, 0])
    with pytest.raises(ValueError, match="expected 6 sensors"):
        det.decision_function(X_test[:, :3])
    bad = X_test.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        det.decision_function(bad)
    with pytest.raises(ValueError, match="at least one time step"):
        cls().fit(np.zeros((0, 3)))
