"""Classical anomaly-detection baselines on multivariate series, with the scikit-learn / PyOD detector contract.

X has shape (n_time, n_sensors). ``fit(X)`` learns from normal data; ``decision_function(X)`` returns raw anomaly
scores, shape (n_time,), higher = more anomalous; ``predict(X)`` returns 0/1 per time step, flagging
``score > threshold_``, where ``threshold_`` is learned label-free at fit time from scores of normal data
(``pipelines.thresholds.fit_threshold``). Learned state ends in an underscore.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.preprocessing import RobustScaler

from pipelines.thresholds import Method, fit_threshold

__all__ = ["IForestDetector", "PCADetector", "RandomDetector"]

_TINY = 1e-12


def _check_X(X: np.ndarray, n_features: int | None = None, name: str = "X") -> np.ndarray:
    """(n_time, n_sensors) finite float array, or a ValueError saying what was expected and what came."""
    a = np.asarray(X, dtype=np.float64)
    if a.ndim != 2:
        hint = " (use X.reshape(-1, 1) for one sensor)" if a.ndim == 1 else ""
        raise ValueError(f"{name}: expected shape (n_time, n_sensors), got {a.shape}{hint}")
    if a.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one time step, got shape {a.shape}")
    if n_features is not None and a.shape[1] != n_features:
        raise ValueError(f"{name}: expected {n_features} sensors (as at fit), got {a.shape[1]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: expected finite values, got {int((~np.isfinite(a)).sum())} NaN/inf")
    return a


class _ThresholdedDetector(BaseEstimator):
    """Shared threshold handling: subclasses implement _fit(X) and decision_function(X)."""

    threshold_method: Method
    q: float
    level: float

    def fit(self, X: np.ndarray, y: None = None, X_threshold: np.ndarray | None = None) -> _ThresholdedDetector:
        """Learn from normal data X (n_time, n_sensors); y is ignored (unsupervised).

        threshold_ is fitted on the scores of X_threshold (held-back normal data) when given, else of X.
        """
        X = _check_X(X)
        self.n_features_in_ = X.shape[1]
        self._fit(X)
        normal = X if X_threshold is None else _check_X(X_threshold, self.n_features_in_, "X_threshold")
        self.threshold_ = fit_threshold(self.decision_function(normal), self.threshold_method, self.q, self.level)
        return self

    def _fit(self, X: np.ndarray) -> None:
        raise NotImplementedError

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _checked(self, X: np.ndarray) -> np.ndarray:
        if not hasattr(self, "n_features_in_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted yet: call fit(X_train) first")
        return _check_X(X, self.n_features_in_)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """0/1 per time step, shape (n_time,): 1 where decision_function(X) > threshold_."""
        return (self.decision_function(X) > self.threshold_).astype(np.int8)


class PCADetector(_ThresholdedDetector):
    """PCA monitoring statistic T^2 + Q on robustly scaled sensors.

    Sensors are scaled with the training median / IQR; PCA keeps the fewest components explaining ``variance`` of
    the training variance. Hotelling's T^2 (squared scores over component variances: distance inside the model
    plane) and Q (squared prediction error: distance off it) are each divided by their ``norm_quantile`` training
    quantile (their empirical control limit), so the score is T^2 / T^2_lim + Q / Q_lim (about 2 at both limits).
    """

    def __init__(
        self,
        variance: float = 0.95,
        norm_quantile: float = 0.99,
        threshold_method: Method = "pot",
        q: float = 1e-3,
        level: float = 0.98,
    ) -> None:
        self.variance = variance
        self.norm_quantile = norm_quantile
        self.threshold_method = threshold_method
        self.q = q
        self.level = level

    def _fit(self, X: np.ndarray) -> None:
        if not 0.0 < self.variance <= 1.0:
            raise ValueError(f"variance: expected a fraction in (0, 1], got {self.variance}")
        self.scaler_ = RobustScaler().fit(X)
        Z = self.scaler_.transform(X)
        n_comp = self.variance if self.variance < 1.0 else min(X.shape)
        self.pca_ = PCA(n_components=n_comp, svd_solver="full").fit(Z)
        self.t2_scale_ = 1.0
        self.q_scale_ = 1.0
        t2, spe = self._t2_q(X)
        self.t2_scale_ = max(float(np.quantile(t2, self.norm_quantile)), _TINY)
        self.q_scale_ = max(float(np.quantile(spe, self.norm_quantile)), _TINY)

    def _t2_q(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised T^2 and Q, each of shape (n_time,)."""
        Z = self.scaler_.transform(X)
        proj = self.pca_.transform(Z)
        t2 = (proj**2 / np.maximum(self.pca_.explained_variance_, _TINY)).sum(axis=1)
        spe = ((Z - self.pca_.inverse_transform(proj)) ** 2).sum(axis=1)
        return t2 / self.t2_scale_, spe / self.q_scale_

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """T^2 / T^2_lim + Q / Q_lim per time step, shape (n_time,)."""
        t2, spe = self._t2_q(self._checked(X))
        return t2 + spe


class IForestDetector(_ThresholdedDetector):
    """scikit-learn IsolationForest on the raw sensor vectors; score = -score_samples (higher = more anomalous)."""

    def __init__(
        self,
        n_estimators: int = 200,
        max_samples: int | float | str = "auto",
        max_features: float = 1.0,
        random_state: int = 0,
        threshold_method: Method = "pot",
        q: float = 1e-3,
        level: float = 0.98,
    ) -> None:
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.max_features = max_features
        self.random_state = random_state
        self.threshold_method = threshold_method
        self.q = q
        self.level = level

    def _fit(self, X: np.ndarray) -> None:
        self.forest_ = IsolationForest(
            n_estimators=self.n_estimators,
            max_samples=self.max_samples,
            max_features=self.max_features,
            random_state=self.random_state,
            n_jobs=1,
        ).fit(X)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Isolation anomaly score in (0, 1] per time step, shape (n_time,)."""
        X = self._checked(X)
        return -self.forest_.score_samples(X)


class RandomDetector(_ThresholdedDetector):
    """Seeded uniform scores in [0, 1): the reference every detector must beat. Same X length -> same scores."""

    def __init__(
        self,
        random_state: int = 0,
        threshold_method: Method = "pot",
        q: float = 1e-3,
        level: float = 0.98,
    ) -> None:
        self.random_state = random_state
        self.threshold_method = threshold_method
        self.q = q
        self.level = level

    def _fit(self, X: np.ndarray) -> None:
        pass

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Uniform [0, 1) scores, shape (n_time,), drawn from random_state (ignores the values of X)."""
        X = self._checked(X)
        return np.random.default_rng(self.random_state).uniform(size=X.shape[0])
