"""pipelines.metrics: against tsb-ad reference values, hand-computed cases, independent oracles and properties."""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipelines import metrics as M

FIXTURES = json.loads((Path(__file__).parent / "data" / "metrics_fixtures.json").read_text())
CASES = {c["name"]: c for c in FIXTURES["cases"]}
FAST = settings(max_examples=60, deadline=None)


# --- reference values computed by the tsb-ad package (see "generated_by" in the fixture) ---------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_tsb_ad_reference(name: str) -> None:
    c = CASES[name]
    y, s, p = np.array(c["labels"]), np.array(c["scores"]), np.array(c["preds"])
    v = M.vus(y, s, max_buffer=c["max_buffer"])
    aff = M.affiliation_prf(y, p)
    ours = {
        "vus_roc": v.roc,
        "vus_pr": v.pr,
        "auc_roc": M.auc_roc(y, s),
        "auc_pr": M.auc_pr(y, s),
        "point_f1": M.point_prf(y, p).f1,
        "affiliation_precision": aff.precision,
        "affiliation_recall": aff.recall,
        "affiliation_f1": aff.f1,
    }
    for key, expected in c["expected"].items():
        assert ours[key] == pytest.approx(expected, abs=1e-9), key


@pytest.mark.parametrize("case", FIXTURES["sliding_windows"], ids=lambda c: c["name"])
def test_sliding_window_matches_tsb_ad(case: dict) -> None:
    assert M.tsb_sliding_window(np.array(case["x"])) == case["expected"]


def test_fixture_covers_the_edge_patterns() -> None:
    starts = {name: np.flatnonzero(np.diff(np.r_[0, c["labels"]]) == 1) for name, c in CASES.items()}
    assert starts["event_at_start"][0] == 0
    assert CASES["event_at_end"]["labels"][-1] == 1
    assert len(starts["several_events_merging"]) >= 4
    assert len(CASES["short_series_fewer_points_than_thresholds"]["labels"]) < M.DEFAULT_N_THRESHOLDS


# --- hand-computed cases ----------------------------------------------------------------------------------------


def test_vus_hand_computed_with_buffer() -> None:
    # event = point 2; the top score sits on the buffer point 1. max_buffer 2 -> w in {0, 1, 2}; only w = 2 has a
    # buffer (w // 2 = 1) with soft label a = sqrt(1 - 1/2) at points 1 and 3.
    y = np.array([0, 0, 1, 0, 0])
    s = np.array([0.1, 0.9, 0.8, 0.2, 0.3])
    a = math.sqrt(0.5)
    tpr0 = a / (1 + a / 2)  # only point 1 flagged: TP = a, P' = 1 + a / 2, the widened event is hit
    fpr0 = (1 - a) / (4 - a / 2)
    roc_w2 = fpr0 * tpr0 / 2 + (1 - fpr0)  # then TPR = 1 from the next threshold on, at the same FPR
    pr_w2 = tpr0 * a + (1 - tpr0) * (1 + a) / 2
    v = M.vus(y, s, max_buffer=2)
    assert v.roc == pytest.approx((0.75 + 0.75 + roc_w2) / 3, abs=1e-12)  # w = 0, 1: plain ROC area 3/4
    assert v.pr == pytest.approx((0.5 + 0.5 + pr_w2) / 3, abs=1e-12)  # w = 0, 1: plain AP 1/2


def test_point_event_far_mar_hand_computed() -> None:
    y = np.array([0, 1, 1, 0, 0, 1, 1, 0, 0, 0])
    p = np.array([1, 0, 1, 0, 0, 0, 0, 0, 1, 1])
    assert M.point_prf(y, p) == pytest.approx((1 / 4, 1 / 4, 1 / 4))
    # events [1, 2] (hit) and [5, 6] (missed); flagged runs [0], [8, 9] touch no event: 2 false-alarm events
    assert M.event_prf(y, p) == pytest.approx((1 / 3, 1 / 2, 0.4))
    far, mar = M.far_mar(y, p)
    assert far == pytest.approx(100 * 3 / 6) and mar == pytest.approx(100 * 3 / 4)


def test_affiliation_hand_computed() -> None:
    # event [4, 6), zone [0, 10); one flagged point 7 = interval [7, 8).
    # precision: mean over x in [7, 8) of (8 - 2 d) / 10 with d = x - 6 in [1, 2]  -> 0.5
    # recall: mean over y in [4, 6) of P(|X - y| >= 7 - y) = (2 y - 4) / 10        -> 0.6
    y = np.zeros(10, int)
    y[4:6] = 1
    p = np.zeros(10, int)
    p[7] = 1
    assert M.affiliation_prf(y, p) == pytest.approx((0.5, 0.6, 2 * 0.3 / 1.1))
    assert M.affiliation_prf(y, y) == pytest.approx((1.0, 1.0, 1.0))


def test_no_anomaly_series_gives_nan_not_errors() -> None:
    y = np.zeros(50, int)
    s = M.random_scores(50, seed=1)
    r = M.evaluate_series(y, s, threshold=0.9)
    for key in ("vus_pr", "vus_roc", "auc_pr", "auc_roc", "recall", "f1", "event_f1", "affiliation_f1", "mar"):
        assert math.isnan(r[key]), key
    assert r["far"] == pytest.approx(100 * (s > 0.9).mean())
    assert r["prevalence"] == 0.0
    assert math.isnan(M.auc_roc(np.ones(5, int), np.arange(5.0)))  # a single class either way
    assert all(math.isnan(x) for x in M.vus(np.ones(5, int), np.arange(5.0)))


def test_nothing_flagged_scores_zero() -> None:
    y = np.array([0, 0, 1, 1, 0])
    none = np.zeros(5, int)
    assert M.point_prf(y, none) == (0.0, 0.0, 0.0)
    assert M.event_prf(y, none) == (0.0, 0.0, 0.0)
    assert M.affiliation_prf(y, none) == (0.0, 0.0, 0.0)
    assert M.far_mar(y, none) == (0.0, 100.0)


def test_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="only 0 and 1"):
        M.auc_roc(np.array([0, 2, 1]), np.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        M.vus(np.array([0, 1, 0]), np.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        M.vus(np.array([0, 1, 0]), np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        M.point_prf(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="preds"):
        M.event_prf(np.array([0, 1]), np.array([0, 1, 1]))


def test_evaluate_series_keys_and_threshold_rule() -> None:
    y = np.array([0] * 20 + [1] * 5 + [0] * 20)
    s = y * 2.0 + np.linspace(0, 1, y.size)
    r = M.evaluate_series(y, s, threshold=2.0, max_buffer=10)
    assert tuple(r) == M.METRIC_KEYS
    flagged = s > 2.0  # strictly above the threshold
    assert r["recall"] == pytest.approx(flagged[y == 1].mean())
    assert r["prevalence"] == pytest.approx(5 / 45)


def test_macro_mean_std_and_nan_skipping() -> None:
    m = M.macro([{"a": 1.0, "b": 0.0}, {"a": 3.0, "b": math.nan}, {"a": 2.0, "b": 1.0}])
    assert m["a"] == pytest.approx({"mean": 2.0, "std": np.std([1, 3, 2]), "n": 3})
    assert m["b"] == pytest.approx({"mean": 0.5, "std": 0.5, "n": 2})


def test_random_row_is_seeded_and_near_chance() -> None:
    rng = np.random.default_rng(3)
    labels = [(rng.uniform(size=400) < 0.02).cumsum() % 2 for _ in range(3)]  # alternating on/off runs
    r1, r2 = M.random_row(labels, seeds=(0, 1)), M.random_row(labels, seeds=(0, 1))
    assert r1 == r2
    assert r1["auc_roc"]["n"] == 6
    assert abs(r1["auc_roc"]["mean"] - 0.5) < 0.1
    np.testing.assert_array_equal(M.random_scores(10, 5), M.random_scores(10, 5))


def test_vus_scales_to_100k_points() -> None:
    # complexity guard (O(n log n + L n)); a regression to O(n * thresholds * L) would take minutes
    rng = np.random.default_rng(0)
    y = np.zeros(100_000, int)
    for a in rng.choice(99_900, 300, replace=False):
        y[a : a + rng.integers(1, 60)] = 1
    s = rng.uniform(size=y.size) + 0.5 * y
    t = time.perf_counter()
    v = M.vus(y, s, max_buffer=100)
    assert time.perf_counter() - t < 5.0
    assert 0.5 < v.roc <= 1 and 0 < v.pr <= 1


# --- properties -------------------------------------------------------------------------------------------------


@st.composite
def labelled_scores(draw, min_n: int = 3, max_n: int = 300):
    n = draw(st.integers(min_n, max_n))
    y = draw(arrays(np.int8, n, elements=st.integers(0, 1)))
    i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 2))
    y[i], y[j if j < i else j + 1] = 1, 0  # both classes present
    s = draw(arrays(np.int64, n, elements=st.integers(0, 40)))  # integers: many ties, exact monotone maps
    buffer = draw(st.integers(0, 30))
    return y, s.astype(float), buffer


@FAST
@given(labelled_scores(), st.floats(0, 40))
def test_all_metrics_in_range(case, threshold: float) -> None:
    y, s, buffer = case
    r = M.evaluate_series(y, s, threshold, max_buffer=buffer)
    for key in ("vus_pr", "vus_roc", "auc_pr", "auc_roc", "f1", "precision", "recall", "event_f1", "affiliation_f1"):
        assert 0.0 <= r[key] <= 1.0 + 1e-12, key
    assert 0.0 <= r["far"] <= 100.0 and 0.0 <= r["mar"] <= 100.0


@FAST
@given(labelled_scores())
def test_perfect_score_gives_one(case) -> None:
    y, _, buffer = case
    r = M.evaluate_series(y, y * 3.0 - 1.0, threshold=0.5, max_buffer=buffer)
    for key in ("vus_pr", "vus_roc", "auc_pr", "auc_roc", "f1", "event_f1", "affiliation_f1"):
        assert r[key] == pytest.approx(1.0), key
    assert r["far"] == 0.0 and r["mar"] == 0.0


@FAST
@given(labelled_scores())
def test_threshold_free_metrics_invariant_to_monotone_maps(case) -> None:
    y, s, buffer = case
    t = np.exp(s / 7.0) * 3.0 - 100.0  # strictly increasing, preserves every tie and order on these integers
    assert M.vus(y, t, buffer) == pytest.approx(M.vus(y, s, buffer), abs=1e-12)
    assert M.auc_roc(y, t) == pytest.approx(M.auc_roc(y, s), abs=1e-12)
    assert M.auc_pr(y, t) == pytest.approx(M.auc_pr(y, s), abs=1e-12)


@FAST
@given(st.integers(3, 250), st.data())
def test_vus_without_buffer_on_one_event_is_point_auc(n: int, data) -> None:
    # one event, distinct scores, n <= 250 (every rank is a threshold), L = 0: the range curves are the point ones
    a = data.draw(st.integers(0, n - 2))
    b = data.draw(st.integers(a, n - 2 if a == 0 else n - 1))
    y = np.zeros(n, int)
    y[a : b + 1] = 1
    s = np.random.default_rng(data.draw(st.integers(0, 2**16))).permutation(n).astype(float)
    v = M.vus(y, s, max_buffer=0)
    assert v.roc == pytest.approx(M.auc_roc(y, s), abs=1e-12)
    assert v.pr == pytest.approx(M.auc_pr(y, s), abs=1e-12)


def _events(mask: np.ndarray) -> list[tuple[int, int]]:
    out, start = [], None
    for i, v in enumerate(list(mask) + [0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i - 1))
            start = None
    return out


@FAST
@given(arrays(np.int8, st.integers(1, 80), elements=st.integers(0, 1)),
       arrays(np.int8, 80, elements=st.integers(0, 1)))
def test_event_counts_match_a_loop_oracle(y, p) -> None:
    p = p[: y.size]
    events, runs = _events(y), _events(p)
    tp = sum(any(p[a : b + 1]) for a, b in events)
    fp = sum(not any(y[a : b + 1]) for a, b in runs)
    prec, rec, f1 = M.event_prf(y, p)
    if not events:
        assert math.isnan(rec)
        return
    assert rec == pytest.approx(tp / len(events))
    assert prec == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)
    assert f1 == pytest.approx(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))


def _affiliation_oracle(y: np.ndarray, p: np.ndarray, grid: int = 64) -> tuple[float, float]:
    """Midpoint-rule integration of the affiliation definitions (independent of the closed forms)."""
    n = y.size
    gt = [(a, b + 1) for a, b in _events(y)]
    pr = [(a, b + 1) for a, b in _events(p)]
    cuts = [0.0] + [(gt[j][1] + gt[j + 1][0]) / 2 for j in range(len(gt) - 1)] + [float(n)]
    precs, recs = [], []
    for j, (js, je) in enumerate(gt):
        el, eh = cuts[j], cuts[j + 1]
        pieces = [(max(a, el), min(b, eh)) for a, b in pr if min(b, eh) > max(a, el)]
        if not pieces:
            recs.append(0.0)
            continue
        xs = np.concatenate([a + (np.arange(grid * (b - a)) + 0.5) / grid for a, b in pieces])
        d = np.maximum(js - xs, 0) + np.maximum(xs - je, 0)  # P(dist(X, J) >= d), X ~ U[el, eh]
        surv = np.where(d <= 0, 1.0, (np.maximum(js - el - d, 0) + np.maximum(eh - je - d, 0)) / (eh - el))
        precs.append(surv.mean())
        ys = js + (np.arange(grid * (je - js)) + 0.5) / grid
        d = np.min([np.maximum(a - ys, 0) + np.maximum(ys - b, 0) for a, b in pieces], axis=0)
        surv = np.where(d <= 0, 1.0, (np.maximum(ys - d - el, 0) + np.maximum(eh - ys - d, 0)) / (eh - el))
        recs.append(surv.mean())
    return (float(np.mean(precs)) if precs else 0.0), float(np.mean(recs))


@FAST
@given(arrays(np.int8, st.integers(2, 60), elements=st.integers(0, 1)),
       arrays(np.int8, 60, elements=st.integers(0, 1)))
def test_affiliation_matches_numerical_integration(y, p) -> None:
    p = p[: y.size]
    if not y.any():
        return
    prec, rec, _ = M.affiliation_prf(y, p)
    o_prec, o_rec = _affiliation_oracle(y, p)
    assert prec == pytest.approx(o_prec, abs=2e-3)
    assert rec == pytest.approx(o_rec, abs=2e-3)
