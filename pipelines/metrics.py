"""Detection-quality metrics over per-point arrays (the protocol is docs/EVALUATION.md).

Conventions, shared by every function here:
- ``labels``: 0/1 array, shape (n_time,), 1 = anomalous point. An *event* is a maximal run of 1s.
- ``scores``: float array, shape (n_time,), higher = more anomalous; must be finite.
- ``preds``: 0/1 array, shape (n_time,); a detector flags a point when ``score > threshold``.
- Undefined because of the labels (a single class, e.g. a series without anomalies): NaN, so that ``macro``
  skips it. Undefined because nothing was flagged: 0 (scikit-learn's ``zero_division=0``).

Point-adjusted F1 is deliberately absent: it rewards random scores (EVALUATION.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = [
    "DEFAULT_MAX_BUFFER",
    "METRIC_KEYS",
    "PRF",
    "VUS",
    "affiliation_prf",
    "auc_pr",
    "auc_roc",
    "evaluate_series",
    "event_prf",
    "far_mar",
    "macro",
    "point_prf",
    "random_row",
    "random_scores",
    "tsb_sliding_window",
    "vus",
    "vus_pr",
    "vus_roc",
]

DEFAULT_MAX_BUFFER = 100  # TSB-AD get_metrics(slidingWindow=100): VUS volumes over buffers 0..100 points
DEFAULT_N_THRESHOLDS = 250  # TSB-AD's `thre`: thresholds taken at evenly spaced ranks of the sorted scores

METRIC_KEYS = (
    "vus_pr",
    "vus_roc",
    "auc_pr",
    "auc_roc",
    "f1",
    "precision",
    "recall",
    "event_f1",
    "affiliation_f1",
    "far",
    "mar",
    "prevalence",
)


class PRF(NamedTuple):
    """Precision, recall and their harmonic mean, each in [0, 1] (or NaN when the labels make it undefined)."""

    precision: float
    recall: float
    f1: float


class VUS(NamedTuple):
    """Volume under the range-aware ROC and PR surfaces, each in [0, 1]."""

    roc: float
    pr: float


# ---------------------------------------------------------------------------------------------------------------
# input checks and run helpers


def _as_binary(x: np.ndarray | Sequence[int], name: str) -> np.ndarray:
    """1-D 0/1 (or bool) input -> bool array; raises with what was expected and what came."""
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of 0/1 per time step, got shape {a.shape}")
    if a.dtype == bool:
        return a
    if a.size and not np.isin(a, (0, 1)).all():
        bad = a[~np.isin(a, (0, 1))][:3]
        raise ValueError(f"{name}: expected only 0 and 1, got values such as {bad.tolist()}")
    return a.astype(bool)


def _as_scores(x: np.ndarray | Sequence[float], n: int, name: str = "scores") -> np.ndarray:
    """1-D finite float input of length n -> float64 array."""
    a = np.asarray(x, dtype=np.float64)
    if a.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},) to match the labels, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: expected finite values, got {int((~np.isfinite(a)).sum())} NaN/inf")
    return a


def _pair(labels: np.ndarray | Sequence[int], preds: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    y = _as_binary(labels, "labels")
    p = _as_binary(preds, "preds")
    if p.shape != y.shape:
        raise ValueError(f"preds: expected shape {y.shape} to match the labels, got {p.shape}")
    return y, p


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of True: (starts, ends), ends inclusive, both int64 arrays of equal length."""
    d = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1


def _f1(p: float, r: float) -> float:
    if math.isnan(p) or math.isnan(r):
        return math.nan
    return 0.0 if p + r == 0 else 2.0 * p * r / (p + r)


# ---------------------------------------------------------------------------------------------------------------
# threshold-free metrics


def auc_roc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the point-wise ROC curve; NaN when the labels hold a single class."""
    y = _as_binary(labels, "labels")
    s = _as_scores(scores, y.size)
    if y.all() or not y.any():
        return math.nan
    return float(roc_auc_score(y, s))


def auc_pr(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (step-wise area under the point-wise PR curve); NaN when the labels hold a single class."""
    y = _as_binary(labels, "labels")
    s = _as_scores(scores, y.size)
    if y.all() or not y.any():
        return math.nan
    return float(average_precision_score(y, s))


def vus(
    labels: np.ndarray,
    scores: np.ndarray,
    max_buffer: int = DEFAULT_MAX_BUFFER,
    n_thresholds: int = DEFAULT_N_THRESHOLDS,
) -> VUS:
    """Volume under the range-aware ROC and PR surfaces (Paparrizos et al., VLDB 2022), as TSB-AD computes them.

    For every buffer length w in 0..max_buffer, each event is widened by w//2 points on both sides with soft
    labels sqrt(1 - d/w) at distance d (overlaps clip at 1). At each of ``n_thresholds`` thresholds (scores at
    evenly spaced ranks, a point is flagged when score >= threshold):
    - TP = flagged anomalous points + soft labels of flagged buffer points, P' = P + (that soft sum) / 2,
    - TPR = min(TP / P', 1) * (fraction of widened events with a flagged point), FPR = (flagged - TP) / (n - P'),
    - precision = TP / flagged.
    The ROC area (trapezoids through (0, 0) and (1, 1)) and the PR area (sum of TPR steps times precision) are
    averaged over the max_buffer + 1 buffer lengths. Vectorised: O(n log n + max_buffer * n).

    Args:
        labels: (n_time,) 0/1. scores: (n_time,) float. max_buffer: largest buffer length L in points (TSB-AD's
            slidingWindow; see ``tsb_sliding_window``). n_thresholds: number of thresholds.
    Returns:
        VUS(roc, pr); both NaN when the labels hold a single class.
    """
    y = _as_binary(labels, "labels")
    s = _as_scores(scores, y.size)
    if max_buffer < 0 or n_thresholds < 1:
        raise ValueError(f"expected max_buffer >= 0 and n_thresholds >= 1, got {max_buffer}, {n_thresholds}")
    n = y.size
    starts, ends = _runs(y)
    if starts.size == 0 or y.all():
        return VUS(math.nan, math.nan)
    n_pos = float(y.sum())

    # Thresholds at evenly spaced ranks of the descending scores; `first[i]` = index of the first (highest)
    # threshold that flags point i, so "flagged at threshold j" <=> first[i] <= j (the flagged sets are nested).
    thr = np.sort(s)[::-1][np.linspace(0, n - 1, n_thresholds).astype(int)]
    first = np.searchsorted(-thr, -s, side="left")
    n_flagged = np.cumsum(np.bincount(first, minlength=n_thresholds)).astype(np.float64)
    tp_events = np.cumsum(np.bincount(first[y], minlength=n_thresholds)).astype(np.float64)
    first_pad = np.append(first, n_thresholds)  # sentinel so that reduceat may index one past the end

    # Normal points that a buffer of max_buffer can reach, with their two nearest "ramp sources": event ends to
    # their left and event starts to their right (several sources can reach one point; the sum clips at 1, and any
    # two sources within w//2 already give >= 2 * sqrt(1/2) > 1).
    reach = max_buffer // 2
    near = np.zeros(n + 1, dtype=np.int64)
    np.add.at(near, np.maximum(starts - reach, 0), 1)
    np.add.at(near, np.minimum(ends + reach, n - 1) + 1, -1)
    cand = np.flatnonzero((np.cumsum(near[:-1]) > 0) & ~y)
    inf = np.iinfo(np.int64).max // 4
    dist = np.full((4, cand.size), inf, dtype=np.int64)
    il = np.searchsorted(ends, cand, side="left")  # ends[il - 1] < cand
    for k, col in ((1, 0), (2, 1)):
        ok = il - k >= 0
        dist[col, ok] = cand[ok] - ends[il[ok] - k]
    ir = np.searchsorted(starts, cand, side="right")  # starts[ir] > cand
    for k, col in ((0, 2), (1, 3)):
        ok = ir + k < starts.size
        dist[col, ok] = starts[ir[ok] + k] - cand[ok]
    dist.sort(axis=0)
    d1, d2 = dist[0], dist[1]
    first_cand = first[cand]

    rocs = np.empty(max_buffer + 1)
    prs = np.empty(max_buffer + 1)
    for w in range(max_buffer + 1):
        h = w // 2
        if h > 0:
            soft = np.where(d1 <= h, np.sqrt(1.0 - np.minimum(d1, h) / w), 0.0)
            soft[d2 <= h] = 1.0
            buf = np.cumsum(np.bincount(first_cand, weights=soft, minlength=n_thresholds))
        else:
            buf = np.zeros(n_thresholds)
        # widened events (merged when their buffers touch) and the first threshold that flags a point in each
        new_group = np.concatenate(([True], starts[1:] - ends[:-1] > 2 * h))
        g_lo = np.maximum(starts[new_group] - h, 0)
        g_hi = np.minimum(ends[np.append(np.flatnonzero(new_group)[1:] - 1, starts.size - 1)] + h, n - 1)
        bounds = np.empty(2 * g_lo.size, dtype=np.int64)
        bounds[0::2], bounds[1::2] = g_lo, g_hi + 1
        g_first = np.minimum.reduceat(first_pad, bounds)[0::2]
        existence = np.cumsum(np.bincount(g_first, minlength=n_thresholds + 1)[:n_thresholds]) / g_lo.size

        tp = tp_events + buf
        p_new = n_pos + buf / 2.0
        tpr = np.minimum(tp / p_new, 1.0) * existence
        fpr = (n_flagged - tp) / (n - p_new)
        precision = tp / n_flagged
        tpr_c = np.concatenate(([0.0], tpr, [1.0]))
        fpr_c = np.concatenate(([0.0], fpr, [1.0]))
        rocs[w] = np.dot(np.diff(fpr_c), (tpr_c[1:] + tpr_c[:-1]) / 2.0)
        prs[w] = np.dot(np.diff(tpr_c[:-1]), precision)
    return VUS(float(rocs.mean()), float(prs.mean()))


def vus_roc(labels: np.ndarray, scores: np.ndarray, max_buffer: int = DEFAULT_MAX_BUFFER) -> float:
    """VUS-ROC; see ``vus``."""
    return vus(labels, scores, max_buffer).roc


def vus_pr(labels: np.ndarray, scores: np.ndarray, max_buffer: int = DEFAULT_MAX_BUFFER) -> float:
    """VUS-PR (TSB-AD's recommended measure); see ``vus``."""
    return vus(labels, scores, max_buffer).pr


def tsb_sliding_window(x: np.ndarray, max_lag: int = 400, default: int = 125) -> int:
    """TSB-AD's data-driven window (period): the lag of the highest local maximum of the autocorrelation.

    TSB-AD's benchmark uses this (on the first channel) as VUS's max buffer. Lags below 3 are ignored; a best lag
    outside 3..300 (or none: flat or aperiodic data) gives ``default``. Only the first 20,000 points are used.
    Args: x: (n_time,) or (n_time, 1) values. Returns the window in points.
    """
    a = np.asarray(x, dtype=np.float64).squeeze()
    if a.ndim != 1:
        raise ValueError(f"x: expected one channel, shape (n_time,), got {np.asarray(x).shape}")
    a = a[:20000] - a[:20000].mean()
    n = a.size
    if n < 2:
        return default
    spec = np.fft.rfft(a, n=2 ** int(np.ceil(np.log2(2 * n - 1))))
    acov = np.fft.irfft(spec * np.conj(spec))[: min(max_lag + 1, n)]
    if acov[0] <= 0:
        return default
    acf = (acov / acov[0])[3:]
    if acf.size < 3:
        return default
    inner = acf[1:-1]
    peaks = np.flatnonzero((inner > acf[:-2]) & (inner > acf[2:])) + 1
    if peaks.size == 0:
        return default
    best = int(peaks[np.argmax(acf[peaks])])
    return default if best < 3 or best > 300 else best + 3


# ---------------------------------------------------------------------------------------------------------------
# metrics at a threshold


def point_prf(labels: np.ndarray, preds: np.ndarray) -> PRF:
    """Point-wise precision, recall, F1 (no point adjustment)."""
    y, p = _pair(labels, preds)
    tp = float((y & p).sum())
    recall = tp / y.sum() if y.any() else math.nan
    precision = tp / p.sum() if p.any() else (math.nan if not y.any() else 0.0)
    return PRF(precision, recall, _f1(precision, recall))


def event_prf(labels: np.ndarray, preds: np.ndarray) -> PRF:
    """Event-wise precision, recall, F1.

    An event (run of 1s in labels) is detected when any of its points is flagged; recall = detected / events.
    False alarms are counted as events too: a run of flagged points that touches no event is one false-positive
    event; precision = detected / (detected + false-positive runs).
    (TSB-AD's "Event-based-F1" instead mixes event recall with point precision; this is the stricter event view.)
    """
    y, p = _pair(labels, preds)
    gs, ge = _runs(y)
    ps, pe = _runs(p)
    cum_p = np.concatenate(([0], np.cumsum(p)))
    cum_y = np.concatenate(([0], np.cumsum(y)))
    tp = int((cum_p[ge + 1] - cum_p[gs] > 0).sum())
    fp = int((cum_y[pe + 1] - cum_y[ps] == 0).sum())
    recall = tp / gs.size if gs.size else math.nan
    precision = tp / (tp + fp) if tp + fp else (math.nan if not gs.size else 0.0)
    return PRF(precision, recall, _f1(precision, recall))


def far_mar(labels: np.ndarray, preds: np.ndarray) -> tuple[float, float]:
    """SKAB's false-alarm rate FP / (FP + TN) and missed-alarm rate FN / (FN + TP), both in percent."""
    y, p = _pair(labels, preds)
    fp, tn = float((p & ~y).sum()), float((~p & ~y).sum())
    fn, tp = float((~p & y).sum()), float((p & y).sum())
    far = 100.0 * fp / (fp + tn) if fp + tn else math.nan
    mar = 100.0 * fn / (fn + tp) if fn + tp else math.nan
    return far, mar


# Affiliation metrics (Huet, Navarro, Rossi, KDD 2022). A flagged index i is the interval [i, i + 1); the time
# axis [0, n) is cut at the midpoints between consecutive events into one affiliation zone E per event J. In E,
# precision averages over flagged x the survival P(dist(X, J) >= dist(x, J)) of a uniform X on E; recall averages
# over y in J the survival P(|X - y| >= dist(y, flagged)) with the flagged set cut to E. Zone values are averaged
# (precision over zones that hold a flagged point).


def _precision_integral(a: float, b: float, js: float, je: float, el: float, eh: float) -> float:
    """Integral over x in [a, b] (inside zone [el, eh]) of P(dist(X, J) >= dist(x, J)), J = [js, je]."""
    width, j_len = eh - el, je - js
    m = min(js - el, eh - je)  # room on the narrower side of J
    total = max(0.0, min(b, je) - max(a, js))  # inside J: survival 1
    for d_lo, d_hi in ((js - min(b, js), js - a), (max(a, je) - je, b - je)):
        if d_hi > d_lo:  # a piece of [a, b] outside J, its distances to J spanning [d_lo, d_hi]
            length = d_hi - d_lo
            int_min = (min(d_hi, m) ** 2 - min(d_lo, m) ** 2) / 2.0 + m * (max(d_hi, m) - max(d_lo, m))
            total += length - (int_min + (d_hi**2 - d_lo**2) / 2.0 + j_len * length) / width
    return total


def _recall_integral(ta: float, tb: float, ia: float, ib: float, el: float, eh: float) -> float:
    """Integral over y in [ta, tb] (part of an event) of P(|X - y| >= dist(y, [ia, ib])), X uniform on [el, eh]."""
    width = eh - el
    total = max(0.0, min(tb, ib) - max(ta, ia))  # inside the flagged interval: survival 1
    if ta < ia:  # left of the flagged interval, pivot p = ia: min(d, m_y) + d is p - el, then 2 (p - y)
        p, lo, hi = ia, ta, min(tb, ia)
        if el < p < eh:
            c = (el + p) / 2.0
            u = max(0.0, min(hi, c) - lo)
            v0, v1 = max(lo, c), hi
            v = 2.0 * p * (v1 - v0) - (v1**2 - v0**2) if v1 > v0 else 0.0
            total += (hi - lo) - ((p - el) * u + v) / width
    if tb > ib:  # right of the flagged interval, pivot p = ib: 2 (y - p), then eh - p
        p, lo, hi = ib, max(ta, ib), tb
        if el < p < eh:
            c = (eh + p) / 2.0
            u0, u1 = lo, min(hi, c)
            u = (u1**2 - u0**2) - 2.0 * p * (u1 - u0) if u1 > u0 else 0.0
            v = max(0.0, hi - max(lo, c))
            total += (hi - lo) - (u + (eh - p) * v) / width
    return total


def affiliation_prf(labels: np.ndarray, preds: np.ndarray) -> PRF:
    """Affiliation precision, recall, F1 (Huet et al., KDD 2022); see the comment above for the definition."""
    y, p = _pair(labels, preds)
    n = y.size
    gs, ge = _runs(y)
    if gs.size == 0:
        return PRF(math.nan, math.nan, math.nan)
    ps, pe = _runs(p)
    if ps.size == 0:
        return PRF(0.0, 0.0, 0.0)
    g_start, g_stop = gs.astype(float), ge + 1.0
    p_start, p_stop = ps.astype(float), pe + 1.0
    cuts = np.concatenate(([0.0], (g_stop[:-1] + g_start[1:]) / 2.0, [float(n)]))
    precisions: list[float] = []
    recalls: list[float] = []
    for j in range(gs.size):
        el, eh, js, je = cuts[j], cuts[j + 1], g_start[j], g_stop[j]
        lo = int(np.searchsorted(p_stop, el, side="right"))  # first flagged interval ending after el
        hi = int(np.searchsorted(p_start, eh, side="left"))  # flagged intervals starting before eh
        pieces = [(max(p_start[i], el), min(p_stop[i], eh)) for i in range(lo, hi)]
        pieces = [(a, b) for a, b in pieces if b > a]
        if not pieces:
            recalls.append(0.0)
            continue
        flagged = sum(b - a for a, b in pieces)
        precisions.append(sum(_precision_integral(a, b, js, je, el, eh) for a, b in pieces) / flagged)
        # each point of J is affiliated with its closest flagged piece (zones cut at midpoints, inside E)
        mids = [el] + [(pieces[i][1] + pieces[i + 1][0]) / 2.0 for i in range(len(pieces) - 1)] + [eh]
        rec = 0.0
        for i, (a, b) in enumerate(pieces):
            ta, tb = max(js, mids[i]), min(je, mids[i + 1])
            if tb > ta:
                rec += _recall_integral(ta, tb, a, b, el, eh)
        recalls.append(rec / (je - js))
    precision = float(np.mean(precisions)) if precisions else 0.0
    recall = float(np.mean(recalls))
    return PRF(precision, recall, _f1(precision, recall))


# ---------------------------------------------------------------------------------------------------------------
# per-series evaluation, macro averaging, random reference row


def evaluate_series(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    max_buffer: int = DEFAULT_MAX_BUFFER,
) -> dict[str, float]:
    """All EVALUATION.md metrics for one series; points with ``score > threshold`` are flagged.

    Returns a dict with METRIC_KEYS: vus_pr, vus_roc, auc_pr, auc_roc (threshold-free, on the raw scores);
    f1, precision, recall (point-wise), event_f1, affiliation_f1 (in [0, 1]); far, mar (percent); prevalence
    (fraction of anomalous points).
    """
    y = _as_binary(labels, "labels")
    s = _as_scores(scores, y.size)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold: expected a finite float, got {threshold}")
    p = s > threshold
    v = vus(y, s, max_buffer)
    pt = point_prf(y, p)
    far, mar = far_mar(y, p)
    return {
        "vus_pr": v.pr,
        "vus_roc": v.roc,
        "auc_pr": auc_pr(y, s),
        "auc_roc": auc_roc(y, s),
        "f1": pt.f1,
        "precision": pt.precision,
        "recall": pt.recall,
        "event_f1": event_prf(y, p).f1,
        "affiliation_f1": affiliation_prf(y, p).f1,
        "far": far,
        "mar": mar,
        "prevalence": float(y.mean()) if y.size else math.nan,
    }


def macro(rows: Iterable[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Macro average over series: {key: {"mean", "std", "n"}}; NaN entries (undefined metrics) are skipped.

    std is the population standard deviation over the series; n counts the series that had the metric defined.
    """
    rows = list(rows)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    out: dict[str, dict[str, float]] = {}
    for k in keys:
        vals = np.array([r[k] for r in rows if k in r], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        if vals.size:
            out[k] = {"mean": float(vals.mean()), "std": float(vals.std()), "n": int(vals.size)}
        else:
            out[k] = {"mean": math.nan, "std": math.nan, "n": 0}
    return out


def random_scores(n: int, seed: int = 0) -> np.ndarray:
    """Seeded uniform scores in [0, 1), shape (n,): the random-score reference."""
    return np.random.default_rng(seed).uniform(size=n)


def random_row(
    labels_list: Sequence[np.ndarray],
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    threshold: float = 0.5,
    max_buffer: int = DEFAULT_MAX_BUFFER,
) -> dict[str, dict[str, float]]:
    """Macro metrics of seeded uniform scores on the given series (every series x every seed).

    ``threshold`` on uniform scores flags a fraction 1 - threshold of the points; the threshold-free metrics
    (VUS, AUC) are what the row is for: the level a detector must clear.
    """
    rows = []
    for seed in seeds:
        for i, y in enumerate(labels_list):
            y = _as_binary(y, "labels")
            rows.append(evaluate_series(y, random_scores(y.size, seed * 100_003 + i), threshold, max_buffer))
    return macro(rows)
