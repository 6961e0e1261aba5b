"""pipelines.thresholds: POT on known distributions, fallbacks, validation."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.thresholds import fit_threshold, pot_threshold, quantile_threshold


@pytest.mark.parametrize(
    ("name", "draw", "true_quantile"),
    [
        ("exponential", lambda rng, n: rng.exponential(size=n), math.log(1000)),
        ("pareto_a3", lambda rng, n: rng.pareto(3.0, size=n), 1000 ** (1 / 3) - 1),
        ("uniform", lambda rng, n: rng.uniform(size=n), 0.999),
    ],
)
def test_pot_exceedance_rate_close_to_q(name, draw, true_quantile) -> None:
    rng = np.random.default_rng(11)
    q = 1e-3
    z = fit_threshold(draw(rng, 100_000), method="pot", q=q)
    fresh = draw(rng, 1_000_000)
    assert 0.7 * q < (fresh > z).mean() < 1.4 * q, name
    assert z == pytest.approx(true_quantile, rel=0.05)


def test_pot_extrapolates_beyond_the_sample() -> None:
    # 5,000 normal points, q = 1e-5: only POT can reach the exp(1) quantile log(1e5) = 11.5 (sample max ~ 8.5)
    rng = np.random.default_rng(5)
    x = rng.exponential(size=5000)
    z = pot_threshold(x, q=1e-5)
    assert z > x.max()
    assert z == pytest.approx(math.log(1e5), rel=0.25)


def test_quantile_method_is_the_empirical_quantile() -> None:
    x = np.random.default_rng(0).normal(size=1000)
    assert fit_threshold(x, method="quantile", q=0.01) == pytest.approx(np.quantile(x, 0.99))
    assert quantile_threshold(x, 0.01) == fit_threshold(x, method="quantile", q=0.01)


def test_pot_falls_back_to_quantile() -> None:
    rng = np.random.default_rng(1)
    few = rng.exponential(size=200)  # 98% level leaves 4 exceedances < min_exceedances
    assert pot_threshold(few, q=1e-2) == quantile_threshold(few, 1e-2)
    many = rng.exponential(size=10_000)  # q = 0.05 is below the initial level: no extrapolation
    assert pot_threshold(many, q=0.05, level=0.98) == quantile_threshold(many, 0.05)
    assert pot_threshold(np.full(500, 3.0), q=1e-3) == 3.0  # constant scores: a flat tail


def test_inputs_are_validated() -> None:
    x = np.arange(100.0)
    with pytest.raises(ValueError, match="method"):
        fit_threshold(x, method="mad")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="q"):
        fit_threshold(x, q=0.0)
    with pytest.raises(ValueError, match="1-D"):
        fit_threshold(x.reshape(10, 10))
    with pytest.raises(ValueError, match="finite"):
        fit_threshold(np.r_[x, np.nan])
    with pytest.raises(ValueError, match="level"):
        pot_threshold(x, level=1.0)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from(["exponential", "normal", "lognormal"]))
def test_pot_is_monotone_in_risk(seed: int, dist: str) -> None:
    x = getattr(np.random.default_rng(seed), dist)(size=3000)
    thresholds = [pot_threshold(x, q=q) for q in (3e-2, 1e-2, 1e-3, 1e-4)]
    assert all(math.isfinite(t) for t in thresholds)
    assert thresholds == sorted(thresholds)


def test_pot_is_affine_equivariant() -> None:
    x = np.random.default_rng(2).exponential(size=20_000)
    assert pot_threshold(3.0 * x + 10.0) == pytest.approx(3.0 * pot_threshold(x) + 10.0, rel=1e-3)
