"""Detection-quality evaluation under docs/EVALUATION.md: every method, same protocol, several seeds.

Stages (labels are read in the last one only):
1. data: ``skab_data`` / ``synthetic_data`` -> `EvalData`, a list of `EvalSeries` (training part, test part, test
   labels and, for the synthetic plant, the anomaly kind of every test point and the sensors each anomaly involves).
2. fit + score: ``fit_and_score`` trains / fits each method on the training parts only, fits its label-free
   threshold on training / held-back normal data, and scores the test parts -> `MethodRun` (scores, thresholds).
   It never reads ``EvalSeries.labels``, ``EvalSeries.kinds`` or ``EvalSeries.events``.
3. metrics: ``summarise`` scores every run against the labels (pipelines.metrics: per series, then macro), and
   aggregates over seeds (mean, std) -> the metrics dict that ``write_outputs`` saves as metrics.json / metrics.md.

Methods: ``random`` (uniform scores), ``pca`` (T^2 + Q), ``iforest`` (IsolationForest), ``rom`` (Routing Mamba,
E experts, top-K), ``dense_active`` and ``dense_total`` (dense Mamba forecasters whose d_model is chosen so that
their ACTIVE, resp. TOTAL, parameter count matches the RoM model's). The classical methods are fitted per series;
a neural method trains ONE forecaster for all series of the dataset (one backbone for all equipment, as the
product does) through ``train_neural``, the single adapter to ``pipelines.train``.

Protocols
- SKAB (valve1): per labelled file, training part = its first 400 rows, test part = the rest; anomaly-free.csv is
  extra normal training data. anomaly-free.csv runs in another operating regime (flow ~125 vs ~32,
  accelerometers ~8x), so every series is normalised with its own robust scaler (median / IQR) fitted on its own
  training rows only (label-free), for all methods alike. The neural models are trained once on the union of
  all files' training parts plus anomaly-free.csv (never on any test row) instead of once per file.
- synthetic plant (pipelines.generate): per unit, training part = the anomaly-free first ``clean_fraction`` of
  the range, test part = the rest, with the injected labelled anomalies of every kind.

metrics.json layout (``summarise``): {"dataset", "meta", "prevalence", "methods": {name: {<key>: macro mean over
seeds for key in the dataset's metric keys, "std": {key: std over seeds}, "per_seed": {key: [...]},
"series": {series: {key: mean over seeds, "threshold": ...}}, "pooled": {f1/far/mar: {"mean", "std"}},
"seeds", "seconds", and for the neural methods "params" and "nll_test" / "nll_test_normal" ({"mean", "std",
"per_seed"}: mean forecast NLL per observed value in normalised units), for the synthetic plant "per_kind" and,
for the neural methods, "attribution" (``attribution_hits``: hit@3 / top-1 of the sensors alerts blame)}}}.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pipelines.baselines import IForestDetector, PCADetector, RandomDetector
from pipelines.detector import RobustScaler, RoMDetector
from pipelines.metrics import (
    DEFAULT_MAX_BUFFER,
    evaluate_series,
    far_mar,
    macro,
    point_prf,
    tsb_sliding_window,
    vus_pr,
)
from pipelines.skab import SKAB_SENSORS, read_skab_file
from pipelines.thresholds import Method
from rmamba import RoMConfig, count_parameters

__all__ = [
    "CLASSICAL",
    "METHODS",
    "NEURAL",
    "EvalConfig",
    "EvalData",
    "EvalSeries",
    "MethodRun",
    "evaluate",
    "fit_and_score",
    "format_markdown",
    "match_dense",
    "plot_traces",
    "skab_data",
    "summarise",
    "synthetic_data",
    "train_neural",
    "write_outputs",
]

NEURAL = ("rom", "dense_active", "dense_total")
CLASSICAL = ("pca", "iforest", "random")
METHODS = NEURAL + CLASSICAL
BASE_KEYS = ("vus_pr", "vus_roc", "auc_pr", "auc_roc", "f1", "precision", "recall", "event_f1", "affiliation_f1")
SKAB_KEYS = BASE_KEYS + ("far", "mar")
SKAB_TRAIN_ROWS = 400
SKAB_TYPE = "valve1"


# ---------------------------------------------------------------------------------------------------------------
# data


@dataclass
class EvalSeries:
    """One evaluated series (a SKAB file, a plant unit). Values (time, n_sensors) float64, NaN = missing.

    train: rows a method may learn from (anomaly-free by the protocol); test: rows to score;
    labels: (len(test),) int8, 1 = anomalous (used only to compute metrics);
    kinds: (len(test),) int16 index into EvalData.kind_names, -1 on normal points (synthetic only);
    context: trailing training rows a sequence model reads before the test part (warm-up, not scored);
    max_buffer: VUS buffer for this series (TSB-AD's data-driven window of the test part's first channel);
    events: the labelled anomalies as (first, last test row inclusive, kind, indices of the sensors involved)
    (synthetic only: SKAB's labels name no sensors).
    """

    name: str
    equipment_type: str
    sensors: list[str]
    train: np.ndarray
    test: np.ndarray
    labels: np.ndarray
    kinds: np.ndarray | None = None
    context: int = 0
    max_buffer: int = DEFAULT_MAX_BUFFER
    events: tuple[tuple[int, int, str, tuple[int, ...]], ...] = ()


@dataclass
class EvalData:
    """A dataset ready to evaluate: its series, extra normal training data per equipment type (SKAB's
    anomaly-free.csv), the anomaly kinds, and a sentence on how it was split and normalised."""

    dataset: str
    series: list[EvalSeries]
    extra_normal: dict[str, list[np.ndarray]] = field(default_factory=dict)
    kind_names: tuple[str, ...] = ()
    protocol: str = ""
    info: dict = field(default_factory=dict)

    @property
    def sensors(self) -> dict[str, list[str]]:
        """Sensor names per equipment type."""
        out: dict[str, list[str]] = {}
        for s in self.series:
            out.setdefault(s.equipment_type, s.sensors)
        return out

    @property
    def metric_keys(self) -> tuple[str, ...]:
        return SKAB_KEYS if self.dataset == "skab" else BASE_KEYS


def _window(x: np.ndarray, max_buffer: int | None) -> int:
    if max_buffer is not None:
        return int(max_buffer)
    col = x[:, 0]
    return tsb_sliding_window(np.nan_to_num(col, nan=float(np.nanmedian(col)) if np.isfinite(col).any() else 0.0))


def _series_scaler(x: np.ndarray) -> RobustScaler:
    """Robust scaler of one series' training rows, its scale floored at the sensor's std: SKAB's sensors are
    quantised (flow sits at 32.000-32.004 most of the time and steps by ~1), so the IQR alone can be ~1e-3 of the
    real spread and would turn every normal step into hundreds of sigmas."""
    return RobustScaler.fit(x, std_floor=1.0)


def skab_data(path: str | Path, n_train: int = SKAB_TRAIN_ROWS, extra_normal: bool = True,
              series_scaling: bool = True, max_buffer: int | None = None) -> EvalData:
    """SKAB valve1 under the protocol (module docstring). ``path`` is the SKAB folder (with valve1/ and
    anomaly-free/). series_scaling: normalise each series with a RobustScaler fitted on its own training rows."""
    root = Path(path)
    files = sorted((root / "valve1").glob("*.csv"), key=lambda p: int(p.stem) if p.stem.isdigit() else 10**9)
    if not files:
        raise FileNotFoundError(f"no SKAB files under {root / 'valve1'}: expected the SKAB folder (valve1/*.csv, "
                                "anomaly-free/anomaly-free.csv)")
    series = []
    for f in files:
        s = read_skab_file(f)
        if s.labels is None:
            raise ValueError(f"{f}: expected 'anomaly' labels in a valve1 file")
        x = s.frame.select(SKAB_SENSORS).to_numpy().astype(np.float64)
        if len(x) <= n_train + 10:
            raise ValueError(f"{f}: expected more than {n_train + 10} rows, got {len(x)}")
        if series_scaling:
            x = _series_scaler(x[:n_train]).transform(x)
        series.append(EvalSeries(f"valve1/{f.stem}", SKAB_TYPE, list(SKAB_SENSORS), x[:n_train], x[n_train:],
                                 s.labels[n_train:].astype(np.int8), None, n_train,
                                 _window(x[n_train:], max_buffer)))
    extra: dict[str, list[np.ndarray]] = {}
    if extra_normal:
        free = read_skab_file(root / "anomaly-free" / "anomaly-free.csv").frame.select(SKAB_SENSORS).to_numpy()
        free = free.astype(np.float64)
        extra[SKAB_TYPE] = [_series_scaler(free).transform(free) if series_scaling else free]
    scaling = ("each series scaled by its own training rows: median, max(IQR / 1.349, std)" if series_scaling
               else "raw units")
    protocol = (f"SKAB valve1, {len(files)} files: train = first {n_train} rows"
                f"{' + anomaly-free.csv' if extra_normal else ''}, test = the rest; {scaling}")
    return EvalData("skab", series, extra, (), protocol, {"path": str(root), "n_train": n_train,
                                                           "extra_normal": extra_normal,
                                                           "series_scaling": series_scaling})


def synthetic_data(days: float = 30.0, scale: float = 1.0, seed: int = 0, out_dir: str | Path | None = None,
                   clean_fraction: float = 0.4, context: int = 1440, max_buffer: int | None = None) -> EvalData:
    """The synthetic plant: simulated in memory, or written to ``out_dir`` as plant logs (generate_plant) with its
    in-memory ground truth kept. Per unit: train = the anomaly-free first ``clean_fraction``, test = the rest."""
    from pipelines.generate import ANOMALY_KINDS, generate_plant, simulate_plant

    if out_dir is not None:
        truth = generate_plant(out_dir, days=days, scale=scale, seed=seed, clean_fraction=clean_fraction,
                               overwrite=True, keep_truth=True).truth
    else:
        truth = simulate_plant(days=days, scale=scale, seed=seed, clean_fraction=clean_fraction)
    assert truth is not None
    series = []
    for unit in truth.units:
        names = [c for c in unit.data.columns if c != "timestamp"]
        x = unit.data.select(names).to_numpy().astype(np.float64)
        first = int(round(clean_fraction * len(x)))
        kinds = np.full(len(x), -1, dtype=np.int16)
        for a in unit.anomalies:
            kinds[a.start:a.end + 1] = ANOMALY_KINDS.index(a.kind)
        if (kinds[:first] >= 0).any():
            raise ValueError(f"{unit.equipment_id}: labelled anomalies inside the training period")
        events = tuple((a.start - first, a.end - first, a.kind, tuple(names.index(n) for n in a.sensors if n in names))
                       for a in unit.anomalies)
        series.append(EvalSeries(unit.equipment_id, unit.equipment_type, names, x[:first], x[first:],
                                 (kinds[first:] >= 0).astype(np.int8), kinds[first:], min(context, first),
                                 _window(x[first:], max_buffer), events))
    protocol = (f"synthetic plant (seed {seed}, {days:g} days at 1 min, scale {scale:g}, {len(series)} units): "
                f"train = anomaly-free first {clean_fraction:.0%}, test = the rest with injected anomalies")
    return EvalData("synthetic", series, {}, tuple(ANOMALY_KINDS), protocol,
                    {"days": days, "scale": scale, "plant_seed": seed, "clean_fraction": clean_fraction,
                     "plant_dir": None if out_dir is None else str(out_dir)})


# ---------------------------------------------------------------------------------------------------------------
# configuration and parameter matching


@dataclass
class EvalConfig:
    """What to run. Model: the RoM config (``rom_config``); the dense baselines get the same config with
    num_experts=0 and d_model matched to the RoM model's active / total parameters. Training (pipelines.train):
    ``steps`` AdamW steps of ``batch_size`` windows of ``window`` steps per equipment type, validation every
    ``steps_per_epoch`` steps with early stopping after ``patience`` epochs without improvement; the last
    ``val_fraction`` of every training series is held back for that and for the label-free thresholds."""

    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    d_model: int = 32
    n_layers: int = 2
    expand: int = 2
    num_experts: int = 8
    top_k: int = 1
    gate_on_all: bool = False
    steps: int = 300
    batch_size: int = 8
    window: int = 256
    lr: float = 3e-3
    warmup_steps: int = 20
    steps_per_epoch: int = 50
    patience: int = 3
    val_fraction: float = 0.2
    device: str = "auto"
    threshold_method: Method = "pot"
    q: float = 1e-3
    plot_series: int = 3

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods: expected a non-empty subset of {METHODS}, got {list(self.methods)}")
        if not self.seeds:
            raise ValueError("seeds: expected at least one seed")

    def rom_config(self) -> RoMConfig:
        return RoMConfig(d_model=self.d_model, n_layers=self.n_layers, expand=self.expand,
                         num_experts=self.num_experts, top_k=self.top_k, gate_on_all=self.gate_on_all)


def _count(cfg: RoMConfig, types: dict[str, int]) -> tuple[int, int]:
    row = count_parameters(cfg, types)[-1]
    return row.total, row.active


def match_dense(rom: RoMConfig, types: dict[str, int], which: str) -> RoMConfig:
    """The dense Mamba config (rom's hyperparameters, num_experts=0) whose ``which`` ('active' or 'total')
    parameter count is closest to the RoM model's; d_model is the one free size."""
    if which not in ("active", "total"):
        raise ValueError(f"which: expected 'active' or 'total', got {which!r}")
    goal = _count(rom, types)[0 if which == "total" else 1]
    best, best_gap = rom.d_model, math.inf
    for d in range(2, 16 * rom.d_model + 1):  # parameter counts grow with d_model: stop once past the goal
        cfg = replace(rom, d_model=d, num_experts=0, top_k=1)
        n = _count(cfg, types)[0 if which == "total" else 1]
        if abs(n - goal) < best_gap:
            best, best_gap = d, abs(n - goal)
        if n > goal:
            break
    return replace(rom, d_model=best, num_experts=0, top_k=1)


def model_configs(cfg: EvalConfig, types: dict[str, int]) -> dict[str, RoMConfig]:
    rom = cfg.rom_config()
    return {"rom": rom, "dense_active": match_dense(rom, types, "active"),
            "dense_total": match_dense(rom, types, "total")}


def param_report(configs: dict[str, RoMConfig], types: dict[str, int]) -> dict[str, dict]:
    """Per neural method: d_model, expand, experts, total / active parameters and their ratio to the RoM model's."""
    rom_total, rom_active = _count(configs["rom"], types)
    out = {}
    for name, c in configs.items():
        total, active = _count(c, types)
        out[name] = {"d_model": c.d_model, "n_layers": c.n_layers, "expand": c.expand, "num_experts": c.num_experts,
                     "top_k": c.top_k if c.num_experts else None,
                     "gate_on_all": c.gate_on_all if c.num_experts else None, "total": total, "active": active,
                     "total_vs_rom_total": total / rom_total, "active_vs_rom_active": active / rom_active}
    return out


# ---------------------------------------------------------------------------------------------------------------
# the one adapter to pipelines.train


def train_neural(series: dict[str, list[tuple[np.ndarray, np.ndarray]]], sensors: dict[str, list[str]],
                 model_cfg: RoMConfig, cfg: EvalConfig, seed: int) -> tuple[RoMDetector, dict[str, float]]:
    """Train one detector on normal series {type: [(values (T, n), mask (T, n) bool)]} with
    ``pipelines.train.train_detector`` (the one place this module calls it). The last ``cfg.val_fraction`` of every
    series is held back: early stopping and the label-free thresholds per type are fitted on it.
    Returns (detector, training metrics)."""
    from pipelines.train import TrainConfig, train_detector

    train_cfg = TrainConfig(window=cfg.window, batch_size=cfg.batch_size, steps=cfg.steps,
                            steps_per_epoch=max(1, min(cfg.steps_per_epoch, cfg.steps)), lr=cfg.lr,
                            warmup_steps=min(cfg.warmup_steps, cfg.steps), patience=cfg.patience,
                            val_fraction=cfg.val_fraction, threshold_method=cfg.threshold_method,
                            threshold_q=cfg.q, seed=seed, device=cfg.device)
    result = train_detector(series, sensors, model_cfg, train_cfg)
    return result.detector, dict(result.metrics)


# ---------------------------------------------------------------------------------------------------------------
# fit + score (no labels)


@dataclass
class MethodRun:
    """One method at one seed: per series (in EvalData order) test scores, threshold and, for the neural
    models, per-step forecast NLL summed over observed sensors, the number of observed sensors and the per-sensor
    attribution (test steps x sensors, float32) that alerts rank their sensors by."""

    method: str
    seed: int
    scores: list[np.ndarray]
    thresholds: list[float]
    nll_sum: list[np.ndarray] | None = None
    nll_count: list[np.ndarray] | None = None
    seconds: float = 0.0
    train_metrics: dict[str, float] = field(default_factory=dict)
    attributions: list[np.ndarray] | None = None


def _finite(scores: np.ndarray) -> np.ndarray:
    """NaN (unscored steps) -> the lowest finite score, so that metrics see finite values and never flag them."""
    s = np.asarray(scores, dtype=np.float64)
    bad = ~np.isfinite(s)
    if bad.any():
        s = s.copy()
        s[bad] = s[~bad].min() if (~bad).any() else 0.0
    return s


def _classical(method: str, seed: int, cfg: EvalConfig):
    thr = {"threshold_method": cfg.threshold_method, "q": cfg.q}
    if method == "pca":
        return PCADetector(**thr)
    if method == "iforest":
        return IForestDetector(random_state=seed, **thr)
    return RandomDetector(random_state=seed, **thr)


def _fit_classical(method: str, seed: int, data: EvalData, cfg: EvalConfig) -> MethodRun:
    """Per series: fit on its training part plus the type's extra normal data; threshold from training scores."""
    scores, thresholds = [], []
    for i, s in enumerate(data.series):
        X_train = np.vstack([s.train, *data.extra_normal.get(s.equipment_type, [])])
        if np.isnan(X_train).any() or np.isnan(s.test).any():  # classical detectors need complete rows
            med = np.nanmedian(X_train, axis=0)
            X_train, test = np.where(np.isnan(X_train), med, X_train), np.where(np.isnan(s.test), med, s.test)
        else:
            test = s.test
        det = _classical(method, seed * 1000 + i if method == "random" else seed, cfg).fit(X_train)
        scores.append(det.decision_function(test))
        thresholds.append(float(det.threshold_))
    return MethodRun(method, seed, scores, thresholds)


def _fit_neural(method: str, seed: int, data: EvalData, cfg: EvalConfig, model_cfg: RoMConfig) -> MethodRun:
    """Train one forecaster on all training parts (+ extra normal data); score each test part after a warm-up
    over its last ``context`` training rows; threshold = the detector's label-free one for the series' type."""
    train: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for s in data.series:
        train.setdefault(s.equipment_type, []).append((s.train, np.isfinite(s.train)))
    for t, extra in data.extra_normal.items():
        train.setdefault(t, []).extend((x, np.isfinite(x)) for x in extra)
    det, train_metrics = train_neural(train, data.sensors, model_cfg, cfg, seed)
    run = MethodRun(method, seed, [], [], [], [], train_metrics=train_metrics, attributions=[])
    for s in data.series:
        ctx = s.train[len(s.train) - s.context:]
        res = det.score(np.vstack([ctx, s.test]), s.equipment_type)
        run.scores.append(_finite(res.score[len(ctx):]))
        run.thresholds.append(float(det.threshold_[s.equipment_type]))
        observed = np.isfinite(s.test) & res.scored[len(ctx):, None]
        run.nll_sum.append(np.where(observed, res.attribution[len(ctx):], 0.0).sum(1))
        run.nll_count.append(observed.sum(1))
        run.attributions.append(res.attribution[len(ctx):].astype(np.float32))
    return run


def fit_and_score(data: EvalData, cfg: EvalConfig, progress: Callable[[str], None] | None = None
                  ) -> dict[str, list[MethodRun]]:
    """Every method of ``cfg`` at every seed -> {method: [MethodRun per seed]}. Reads no labels.

    ``progress(label)`` is called after each (method, seed) with a short label (for a progress bar).
    """
    types = {t: len(v) for t, v in data.sensors.items()}
    configs = model_configs(cfg, types) if any(m in NEURAL for m in cfg.methods) else {}
    runs: dict[str, list[MethodRun]] = {m: [] for m in cfg.methods}
    for seed in cfg.seeds:
        for method in cfg.methods:
            t0 = time.perf_counter()
            if method in NEURAL:
                run = _fit_neural(method, seed, data, cfg, configs[method])
            else:
                run = _fit_classical(method, seed, data, cfg)
            run.seconds = time.perf_counter() - t0
            runs[method].append(run)
            if progress is not None:
                progress(f"{method} seed {seed} ({run.seconds:.0f} s)")
    return runs


# ---------------------------------------------------------------------------------------------------------------
# metrics (labels used here only)


def _mean_std(values: Sequence[float]) -> dict[str, float | list[float]]:
    v = np.asarray(values, dtype=np.float64)
    ok = v[np.isfinite(v)]
    return {"mean": float(ok.mean()) if ok.size else math.nan, "std": float(ok.std()) if ok.size else math.nan,
            "per_seed": [float(x) for x in v]}


def _per_kind(data: EvalData, run: MethodRun) -> dict[str, dict[str, float]]:
    """Per anomaly kind at one seed: event recall and point recall at the threshold (pooled over series), and
    VUS-PR on each series restricted to normal points + that kind's points (macro over series having it)."""
    out = {}
    for k, kind in enumerate(data.kind_names):
        events = detected = points = hits = 0
        vus = []
        for s, score, thr in zip(data.series, run.scores, run.thresholds):
            if s.kinds is None or not (s.kinds == k).any():
                continue
            flags = score > thr
            is_k = s.kinds == k
            d = np.diff(np.concatenate(([0], is_k.astype(np.int8), [0])))
            for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)):
                events += 1
                detected += bool(flags[a:b].any())
            points += int(is_k.sum())
            hits += int((flags & is_k).sum())
            keep = (s.kinds == -1) | is_k
            vus.append(vus_pr(is_k[keep].astype(np.int8), score[keep], s.max_buffer))
        if events:
            out[kind] = {"events": events, "event_recall": detected / events, "point_recall": hits / points,
                         "vus_pr": float(np.mean(vus))}
    return out


def attribution_hits(data: EvalData, run: MethodRun, top: int = 3) -> dict[str, float]:
    """Which sensors the alerts would blame, against the sensors each labelled anomaly involves. Per event with at
    least one flagged point: the attribution summed over its flagged points ranks the sensors (as an alert's top
    sensors are ranked); ``hit_at_3``: share of those events with an involved sensor among the top ``top``;
    ``top1``: share whose first sensor is involved. NaN when no event has a flagged point."""
    hits, firsts = [], []
    for s, score, thr, attr in zip(data.series, run.scores, run.thresholds, run.attributions or []):
        flags = score > thr
        for a, b, _kind, involved in s.events:
            idx = np.flatnonzero(flags[a:b + 1]) + a
            if not len(idx) or not involved:
                continue
            rank = np.argsort(-np.nansum(attr[idx], axis=0), kind="stable")
            hits.append(bool(set(rank[:top].tolist()) & set(involved)))
            firsts.append(int(rank[0]) in involved)
    n = len(hits)
    return {"events": float(n), "hit_at_3": float(np.mean(hits)) if n else math.nan,
            "top1": float(np.mean(firsts)) if n else math.nan}


def summarise(data: EvalData, runs: dict[str, list[MethodRun]], cfg: EvalConfig) -> dict:
    """Score every run against the labels -> the metrics dict (layout: module docstring)."""
    keys = data.metric_keys
    types = {t: len(v) for t, v in data.sensors.items()}
    params = param_report(model_configs(cfg, types), types) if any(m in NEURAL for m in runs) else {}
    methods = {}
    for method, seed_runs in runs.items():
        per_seed: dict[str, list[float]] = {k: [] for k in keys}
        series_rows: list[list[dict[str, float]]] = [[] for _ in data.series]
        pooled: dict[str, list[float]] = {"f1": [], "far": [], "mar": []}
        nll, nll_normal = [], []
        kinds: list[dict] = []
        blame: list[dict[str, float]] = []
        for run in seed_runs:
            rows = [evaluate_series(s.labels, sc, thr, s.max_buffer)
                    for s, sc, thr in zip(data.series, run.scores, run.thresholds)]
            for i, r in enumerate(rows):
                series_rows[i].append({**r, "threshold": run.thresholds[i]})
            m = macro(rows)
            for k in keys:
                per_seed[k].append(m[k]["mean"])
            y = np.concatenate([s.labels for s in data.series]).astype(bool)
            p = np.concatenate([sc > thr for sc, thr in zip(run.scores, run.thresholds)])
            far, mar = far_mar(y, p)
            pooled["f1"].append(point_prf(y, p).f1)
            pooled["far"].append(far)
            pooled["mar"].append(mar)
            if run.nll_sum is not None:
                tot, cnt = np.concatenate(run.nll_sum), np.concatenate(run.nll_count)
                nll.append(float(tot.sum() / max(cnt.sum(), 1)))
                nll_normal.append(float(tot[~y].sum() / max(cnt[~y].sum(), 1)))
            if data.kind_names:
                kinds.append(_per_kind(data, run))
            if run.attributions is not None and any(s.events for s in data.series):
                blame.append(attribution_hits(data, run))
        entry: dict = {k: _mean_std(per_seed[k])["mean"] for k in keys}
        entry["std"] = {k: _mean_std(per_seed[k])["std"] for k in keys}
        entry["per_seed"] = per_seed
        entry["series"] = {}
        for s, rows in zip(data.series, series_rows):
            entry["series"][s.name] = {k: float(np.nanmean([r[k] for r in rows])) if any(np.isfinite(r[k])
                                       for r in rows) else math.nan for k in (*keys, "threshold")}
        entry["pooled"] = {k: _mean_std(v) for k, v in pooled.items()}
        entry["seeds"] = [run.seed for run in seed_runs]
        entry["seconds"] = float(np.mean([run.seconds for run in seed_runs]))
        if method in params:
            entry["params"] = params[method]
            entry["nll_test"] = _mean_std(nll)
            entry["nll_test_normal"] = _mean_std(nll_normal)
            entry["train"] = {k: _mean_std([run.train_metrics.get(k, math.nan) for run in seed_runs])
                              for k in ("val_nll", "train_nll", "steps", "best_epoch", "train_seconds")}
        if blame:
            entry["attribution"] = {k: _mean_std([b[k] for b in blame]) for k in ("events", "hit_at_3", "top1")}
        if kinds:
            entry["per_kind"] = {
                kind: {"events": kinds[0][kind]["events"],
                       **{m: _mean_std([kd[kind][m] for kd in kinds]) for m in ("event_recall", "point_recall",
                                                                                 "vus_pr")}}
                for kind in kinds[0]}
        methods[method] = entry
    prevalence = {s.name: float(s.labels.mean()) for s in data.series}
    meta = {"dataset": data.dataset, "protocol": data.protocol, "info": data.info, "seeds": list(cfg.seeds),
            "n_series": len(data.series), "max_buffer": {s.name: s.max_buffer for s in data.series},
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
            "threshold": f"{cfg.threshold_method} q={cfg.q:g}, label-free: classical on training scores, neural "
                         f"on held-back normal validation scores (last {cfg.val_fraction:.0%} of each series)",
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch_threads": torch.get_num_threads(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    pooled_prev = float(np.concatenate([s.labels for s in data.series]).mean())
    return {"dataset": data.dataset, "meta": meta,
            "prevalence": {"macro": float(np.mean(list(prevalence.values()))), "pooled": pooled_prev,
                           "series": prevalence},
            "methods": methods}


def evaluate(data: EvalData, cfg: EvalConfig, progress: Callable[[str], None] | None = None
             ) -> tuple[dict, dict[str, list[MethodRun]]]:
    """fit_and_score, then summarise: (metrics dict, runs)."""
    runs = fit_and_score(data, cfg, progress)
    return summarise(data, runs, cfg), runs


# ---------------------------------------------------------------------------------------------------------------
# outputs: markdown, plots, files

LABELS = {"rom": "RoM (E={E}, K={K})", "dense_active": "dense Mamba, = active", "dense_total": "dense Mamba, = total",
          "pca": "PCA T^2+Q", "iforest": "IsolationForest", "random": "random (uniform)"}


def _label(method: str, metrics: dict) -> str:
    p = metrics["methods"][method].get("params", {})
    label = LABELS[method].format(E=p.get("num_experts"), K=p.get("top_k"))
    return label + ", gate on W_x, W_z, W_o" if p.get("gate_on_all") else label


def _cell(v: float, s: float, digits: int = 3) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    return f"{v:.{digits}f} ± {s:.{digits}f}" if np.isfinite(s) else f"{v:.{digits}f}"


def format_markdown(metrics: dict) -> str:
    """metrics.md: the main table (macro over series, mean ± std over seeds), parameters and per kind."""
    meta, methods = metrics["meta"], metrics["methods"]
    keys = SKAB_KEYS if metrics["dataset"] == "skab" else BASE_KEYS
    keys = tuple(k for k in keys if k not in ("precision", "recall"))
    lines = [f"# Evaluation: {metrics['dataset']}", "", meta["protocol"] + ".", "",
             f"Seeds {meta['seeds']}; metrics per series, then macro over {meta['n_series']} series; "
             "cells are mean ± std over seeds. Threshold " + meta["threshold"] + ". "
             "FAR / MAR in percent. Point-adjusted F1 is deliberately not reported.", "",
             f"Prevalence (share of anomalous test points): macro {metrics['prevalence']['macro']:.3f}, "
             f"pooled {metrics['prevalence']['pooled']:.3f}. Flag-everything pooled F1: "
             f"{2 * metrics['prevalence']['pooled'] / (1 + metrics['prevalence']['pooled']):.3f}.", ""]
    head = ["method", *keys, "pooled F1", "pooled FAR %", "pooled MAR %"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, e in methods.items():
        cells = [_cell(e[k], e["std"][k], 1 if k in ("far", "mar") else 3) for k in keys]
        cells += [_cell(e["pooled"][k]["mean"], e["pooled"][k]["std"], 3 if k == "f1" else 1)
                  for k in ("f1", "far", "mar")]
        lines.append(f"| {_label(m, metrics)} | " + " | ".join(cells) + " |")
    neural = [m for m in methods if "params" in methods[m]]
    if neural:
        lines += ["", "## Neural models: parameters and forecast loss", "",
                  "NLL: mean Gaussian negative log-likelihood per observed sensor value on the test period "
                  "(normalised units; lower is better), all test points and normal test points only.", "",
                  "| method | d_model | experts (E, K) | total params | active params | total / RoM total | "
                  "active / RoM active | test NLL | test NLL (normal) | train+score s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m in neural:
            p, e = methods[m]["params"], methods[m]
            ek = f"{p['num_experts']}, {p['top_k']}" if p["num_experts"] else "dense"
            lines.append(f"| {_label(m, metrics)} | {p['d_model']} | {ek} | {p['total']:,} | {p['active']:,} | "
                         f"{p['total_vs_rom_total']:.3f} | {p['active_vs_rom_active']:.3f} | "
                         f"{_cell(e['nll_test']['mean'], e['nll_test']['std'])} | "
                         f"{_cell(e['nll_test_normal']['mean'], e['nll_test_normal']['std'])} | "
                         f"{e['seconds']:.0f} |")
    blamed = [m for m in methods if "attribution" in methods[m]]
    if blamed:
        lines += ["", "## Which sensors the alerts blame", "",
                  "Per labelled anomaly with at least one flagged point: the sensors ranked by the per-sensor "
                  "attribution summed over its flagged points (as an alert ranks its top sensors), against the "
                  "sensors the anomaly involves (the generator's labels). hit@3: an involved sensor among the top 3; "
                  "top-1: the first one is involved.", "",
                  "| method | events with a flag | hit@3 | top-1 |", "|---|---|---|---|"]
        for m in blamed:
            b = methods[m]["attribution"]
            lines.append(f"| {_label(m, metrics)} | {b['events']['mean']:.1f} | "
                         f"{_cell(b['hit_at_3']['mean'], b['hit_at_3']['std'], 2)} | "
                         f"{_cell(b['top1']['mean'], b['top1']['std'], 2)} |")
    with_kinds = [m for m in methods if "per_kind" in methods[m]]
    if with_kinds:
        kinds = list(methods[with_kinds[0]]["per_kind"])
        lines += ["", "## Per anomaly kind", "",
                  "Event recall (share of events with a flagged point) / point recall at the label-free threshold, "
                  "and VUS-PR on each series restricted to normal points and that kind's points (macro over the "
                  "series having it); mean over seeds.", "",
                  "| kind (events) | " + " | ".join(_label(m, metrics) for m in with_kinds) + " |",
                  "|" + "---|" * (len(with_kinds) + 1)]
        for kind in kinds:
            cells = []
            for m in with_kinds:
                d = methods[m]["per_kind"][kind]
                cells.append(f"{d['event_recall']['mean']:.2f} / {d['point_recall']['mean']:.2f} / "
                             f"VUS-PR {d['vus_pr']['mean']:.3f}")
            lines.append(f"| {kind} ({methods[with_kinds[0]]['per_kind'][kind]['events']}) | " + " | ".join(cells)
                         + " |")
    lines += ["", "## Per series (VUS-PR, mean over seeds)", "",
              "| series | prevalence | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 2)]
    for name, prev in metrics["prevalence"]["series"].items():
        lines.append(f"| {name} | {prev:.3f} | " + " | ".join(f"{methods[m]['series'][name]['vus_pr']:.3f}"
                                                           for m in methods) + " |")
    lines += ["", f"{meta['machine']}, torch threads {meta['torch_threads']}, {meta['created']}.", ""]
    return "\n".join(lines)


def plot_traces(data: EvalData, runs: dict[str, list[MethodRun]], out_dir: str | Path, n_series: int = 3
                ) -> list[Path]:
    """One PNG per method: the first seed's score on ``n_series`` series (labelled test windows shaded), the
    threshold line and the flagged points (alerts). Uses the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    # series with anomalies, spread over equipment types first
    chosen: list[int] = []
    for i, s in enumerate(data.series):
        if s.labels.any() and s.equipment_type not in {data.series[j].equipment_type for j in chosen}:
            chosen.append(i)
    chosen += [i for i, s in enumerate(data.series) if s.labels.any() and i not in chosen]
    chosen = chosen[:n_series]
    paths = []
    for method, seed_runs in runs.items():
        run = seed_runs[0]
        fig, axes = plt.subplots(len(chosen), 1, figsize=(11, 2.3 * len(chosen)), squeeze=False)
        for ax, i in zip(axes[:, 0], chosen):
            s, score, thr = data.series[i], run.scores[i], run.thresholds[i]
            t = np.arange(len(score))
            d = np.diff(np.concatenate(([0], s.labels.astype(np.int8), [0])))
            for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)):
                ax.axvspan(a - 0.5, b - 0.5, color="tab:red", alpha=0.18, lw=0)
            ax.plot(t, score, lw=0.6, color="tab:blue")
            ax.axhline(thr, color="black", ls="--", lw=0.8)
            flagged = score > thr
            ax.scatter(t[flagged], score[flagged], s=3, color="tab:orange", zorder=3)
            lo = float(np.quantile(score, 0.001))
            hi = max(float(np.quantile(score, 0.995)), thr)
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.15 * (hi - lo))
            ax.set_title(f"{s.name}: {int(flagged.sum())} flagged of {len(score)}, threshold {thr:.3g}",
                         fontsize=8, loc="left")
            ax.tick_params(labelsize=7)
        axes[-1, 0].set_xlabel("test step (shaded: labelled anomalies; dashed: label-free threshold; "
                               "orange: alerts)", fontsize=8)
        fig.suptitle(f"{data.dataset}: {method}, seed {run.seed}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"scores_{method}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float | np.floating):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_outputs(data: EvalData, metrics: dict, runs: dict[str, list[MethodRun]], out_dir: str | Path,
                  n_plot: int = 3) -> list[Path]:
    """Write metrics.json (NaN as null), metrics.md and the score-trace PNGs into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=1))
    (out / "metrics.md").write_text(format_markdown(metrics))
    return [out / "metrics.json", out / "metrics.md", *plot_traces(data, runs, out, n_plot)]


def log_to_registry(out_dir: str | Path, metrics: dict, tracking_uri: str) -> str:
    """Log the evaluation (metrics and the files in out_dir) to MLflow through the registry edge; returns the
    run id. Uses pipelines.registry.log_evaluation when it exists, else pipelines.registry_eval's."""
    try:
        from pipelines.registry import log_evaluation
    except ImportError:
        from pipelines.registry_eval import log_evaluation
    return log_evaluation(out_dir, metrics, tracking_uri)
