"""Label-free alarm thresholds fitted on anomaly scores of normal data (training or held-back validation).

Used by the classical baselines and by the model alike: 1-D scores in, one float threshold out; a point is then
flagged when its score is > threshold.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
from scipy.stats import genpareto

__all__ = ["fit_threshold", "pot_threshold", "quantile_threshold"]

Method = Literal["pot", "quantile"]


def _as_normal_scores(normal_scores: np.ndarray) -> np.ndarray:
    x = np.asarray(normal_scores, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"normal_scores: expected a non-empty 1-D array of scores, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"normal_scores: expected finite values, got {int((~np.isfinite(x)).sum())} NaN/inf")
    return x


def _check_q(q: float) -> None:
    if not 0.0 < q < 1.0:
        raise ValueError(f"q: expected a risk level in (0, 1), e.g. 1e-3, got {q}")


def quantile_threshold(normal_scores: np.ndarray, q: float = 1e-3) -> float:
    """Empirical (1 - q) quantile of the normal scores: about a fraction q of normal points exceed it."""
    x = _as_normal_scores(normal_scores)
    _check_q(q)
    return float(np.quantile(x, 1.0 - q))


def pot_threshold(
    normal_scores: np.ndarray,
    q: float = 1e-3,
    level: float = 0.98,
    min_exceedances: int = 20,
) -> float:
    """Peaks-over-threshold (Siffer et al., KDD 2017): the score exceeded with probability q under a GPD tail.

    The exceedances over the initial threshold t (the ``level`` quantile) are fitted with a generalised Pareto
    distribution (shape c, scale s, location 0, maximum likelihood); with n scores and N_t exceedances the threshold is
    z_q = t + s / c * ((q n / N_t)^(-c) - 1)   (t - s log(q n / N_t) when c = 0).
    Falls back to the empirical (1 - q) quantile when there are fewer than ``min_exceedances`` exceedances, when q is
    not beyond the initial level (q n / N_t >= 1: no extrapolation needed) or when the fit fails.
    """
    x = _as_normal_scores(normal_scores)
    _check_q(q)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected the initial quantile level in (0, 1), e.g. 0.98, got {level}")
    t = float(np.quantile(x, level))
    exc = x[x > t] - t
    ratio = q * x.size / max(exc.size, 1)
    if exc.size < min_exceedances or ratio >= 1.0 or np.ptp(exc) == 0.0:
        return quantile_threshold(x, q)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            c, _, s = genpareto.fit(exc, floc=0.0)
    except (ValueError, RuntimeError, FloatingPointError):
        return quantile_threshold(x, q)
    if not (math.isfinite(c) and math.isfinite(s) and s > 0):
        return quantile_threshold(x, q)
    z = t - s * math.log(ratio) if abs(c) < 1e-8 else t + s / c * (ratio ** (-c) - 1.0)
    return float(z) if math.isfinite(z) and z >= t else quantile_threshold(x, q)


def fit_threshold(
    normal_scores: np.ndarray,
    method: Method = "pot",
    q: float = 1e-3,
    level: float = 0.98,
    min_exceedances: int = 20,
) -> float:
    """Label-free threshold from scores of normal data, shape (n,): "pot" (GPD tail, the default) or "quantile".

    ``q`` is the risk level: the target fraction of normal points flagged (false-alarm probability per point).
    """
    if method == "pot":
        return pot_threshold(normal_scores, q=q, level=level, min_exceedances=min_exceedances)
    if method == "quantile":
        return quantile_threshold(normal_scores, q=q)
    raise ValueError(f"method: expected 'pot' or 'quantile', got {method!r}")
