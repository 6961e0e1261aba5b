"""Training: long windows of normal readings -> `RoMForecaster` -> `RoMDetector` (ROM_SPEC sections 3-4).

Stages (frames and configs in, frames and a result out; the only IO is reading the store and the checkpoint):
  load_training_frames(store, types, until)  the ingested store -> {type: {equipment: frame}} up to ``train_until``
  frames_to_series(frames, types, cfg)       -> training series, validation series (the last ``val_fraction`` of
                                              each equipment's range, in time), and a table of data ranges
  train_detector(series, sensors, ...)       the loop; numpy in, so it also runs on SKAB arrays and in tests
  train_from_store(plant, ...)               the three above for one plant.toml

The loop: per-sensor robust scalers fitted on the training part only; every step draws ``batch_size`` windows of
``window`` steps at random offsets for EVERY equipment type (one forward call per type), averages the types'
forecast NLLs and adds the routing auxiliary loss pooled over the types' calls (`RoMForecaster.aux_loss`), so
experts may specialise by type. AdamW (no weight decay on A_log, D, norms, biases, embeddings), linear warmup then
cosine decay to ``min_lr_ratio * lr``, gradient clipping, bf16 autocast on CUDA (fp32 on CPU). Every
``steps_per_epoch`` steps the held-back period is scored in chunks with carried state (`RoMDetector.score`, after a
warm-up on the training steps just before it); early stopping keeps the best weights. Checkpoints hold everything
the future of the run depends on (weights, optimizer, scheduler, RNG states, step, early-stopping state), so an
interrupted run resumed from its checkpoint ends with the same weights as an uninterrupted one (CPU).
Finally, the novelty part of the score is fitted (a Gaussian of the model's features over the training series,
pipelines.detector.NoveltyModel), both score parts are standardised on the validation steps, and label-free
thresholds per type are fitted on the validation scores (normal data never trained on).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from pipelines.config import EquipmentType, PlantConfig
from pipelines.detector import NoveltyModel, RobustScaler, RoMDetector, frame_arrays
from pipelines.ingest.store import TS, read_range, store_index
from pipelines.thresholds import fit_threshold
from rmamba import RoMConfig, RoMForecaster, count_parameters

CHECKPOINT_FILE = "last.pt"
CHECKPOINT_FORMAT = 1
# TrainConfig fields that may differ between a run and its resumption (they do not change the result).
RESUME_FREE = ("device", "checkpoint_dir", "checkpoint_every")


# --- configuration --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """The [train] table of plant.toml. Defaults train the demo model in minutes on 2 CPU cores."""

    window: int = 2048              # steps per training window (the context the model learns over)
    batch_size: int = 2             # windows per equipment type per step
    steps: int = 300                # optimizer steps in all
    steps_per_epoch: int = 50       # validation (and early-stopping check) every this many steps
    lr: float = 3e-3                # peak learning rate
    warmup_steps: int = 20          # linear warmup from lr / warmup_steps
    min_lr_ratio: float = 0.1       # cosine decay ends at min_lr_ratio * lr
    weight_decay: float = 0.05      # AdamW decay of matrices (none on A_log, D, norms, biases, embeddings)
    grad_clip: float = 1.0          # max global gradient norm; 0 = off
    patience: int = 3               # epochs without a val NLL improvement before stopping; 0 = never stop early
    min_delta: float = 1e-3         # a smaller val NLL decrease does not count as an improvement
    val_fraction: float = 0.2       # last share of each equipment's training range held back for validation
    train_until: datetime | None = None  # readings after this instant are never used (UTC; naive = UTC)
    threshold_method: str = "pot"   # label-free threshold on validation scores: "pot" or "quantile"
    threshold_q: float = 1e-3       # target share of normal steps flagged
    seed: int = 0
    device: str = "auto"            # "auto" = cuda when available, else cpu
    checkpoint_dir: str | None = None  # where last.pt goes (the application resolves it); None = no checkpoints
    checkpoint_every: int = 50      # steps between checkpoints (and one at the end)
    score_chunk: int = 4096         # chunk length when scoring the validation period

    def __post_init__(self) -> None:
        for f in fields(self):
            kinds, check, expected = _RULES[f.name]
            value = getattr(self, f.name)
            if f.name == "train_until":
                value = _as_utc(value)
                object.__setattr__(self, f.name, value)
            if value is None:
                ok = type(None) in kinds
            else:
                ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
                ok = ok and not (isinstance(value, float) and not math.isfinite(value)) and check(value)
            if not ok:
                raise ValueError(f"train.{f.name}: expected {expected}, got {value!r}")
            if float in kinds and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
        if self.warmup_steps > self.steps:
            raise ValueError(f"train.warmup_steps: expected <= steps ({self.steps}), got {self.warmup_steps}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from the TOML [train] table; unknown keys are an error naming them."""
        if not isinstance(d, Mapping):
            raise ValueError(f"train: expected a table, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"train.{unknown[0]}: unknown key (expected one of: {', '.join(known)})")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (train_until as ISO 8601) for logging and checkpoints."""
        d = asdict(self)
        d["train_until"] = None if self.train_until is None else self.train_until.isoformat()
        return d

    @property
    def epochs(self) -> int:
        return math.ceil(self.steps / self.steps_per_epoch)


def _as_utc(value: Any) -> Any:
    """str / date / datetime -> aware UTC datetime; anything else is returned for the type check to reject."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            return value
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


def _device_ok(v: str) -> bool:
    if v == "auto":
        return True
    try:
        torch.device(v)
    except (RuntimeError, ValueError):
        return False
    return True


_INT, _NUM = (int,), (int, float)
_RULES: dict[str, tuple[tuple[type, ...], Callable[[Any], bool], str]] = {
    "window": (_INT, lambda v: 16 <= v <= 16384, "an integer in [16, 16384]"),
    "batch_size": (_INT, lambda v: v >= 1, "an integer >= 1"),
    "steps": (_INT, lambda v: v >= 1, "an integer >= 1"),
    "steps_per_epoch": (_INT, lambda v: v >= 1, "an integer >= 1"),
    "lr": (_NUM, lambda v: v > 0, "a number > 0"),
    "warmup_steps": (_INT, lambda v: v >= 0, "an integer >= 0"),
    "min_lr_ratio": (_NUM, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "weight_decay": (_NUM, lambda v: v >= 0, "a number >= 0"),
    "grad_clip": (_NUM, lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "patience": (_INT, lambda v: v >= 0, "an integer >= 0 (0 = no early stopping)"),
    "min_delta": (_NUM, lambda v: v >= 0, "a number >= 0"),
    "val_fraction": (_NUM, lambda v: 0 < v < 1, "a number in (0, 1)"),
    "train_until": ((datetime, type(None)), lambda v: True,
                    "an ISO 8601 timestamp such as '2026-03-20T00:00:00Z' (or a TOML datetime)"),
    "threshold_method": ((str,), lambda v: v in ("pot", "quantile"), "'pot' or 'quantile'"),
    "threshold_q": (_NUM, lambda v: 0 < v < 1, "a risk level in (0, 1), e.g. 1e-3"),
    "seed": (_INT, lambda v: v >= 0, "an integer >= 0"),
    "device": ((str,), _device_ok, "'auto', 'cpu', 'cuda' or 'cuda:<index>'"),
    "checkpoint_dir": ((str, type(None)), lambda v: bool(v), "a folder path"),
    "checkpoint_every": (_INT, lambda v: v >= 1, "an integer >= 1"),
    "score_chunk": (_INT, lambda v: v >= 1, "an integer >= 1"),
}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --- data -----------------------------------------------------------------------------------------------------


@dataclass
class Series:
    """One equipment's readings over a contiguous span of a regular grid, in physical units.

    values (T, n_sensors), NaN where missing; mask (T, n) bool observed (None: the finite values). ``warmup``
    leading steps only build the streaming state (validation: the training steps just before the held-back
    period); they are not scored. timestamps (T,) datetime64[us] (UTC) only serve the data-range report.
    """

    values: np.ndarray
    mask: np.ndarray | None = None
    name: str = ""
    timestamps: np.ndarray | None = None
    warmup: int = 0

    def observed(self) -> np.ndarray:
        """(T, n) bool: observed and finite."""
        ok = np.isfinite(self.values)
        return ok if self.mask is None else ok & np.asarray(self.mask, dtype=bool)

    def __len__(self) -> int:
        return int(self.values.shape[0])


SeriesLike = Series | tuple[np.ndarray, np.ndarray | None] | np.ndarray


def _as_series(x: SeriesLike, etype: str, i: int, n: int) -> Series:
    if isinstance(x, Series):
        s = x
    elif isinstance(x, tuple) and len(x) == 2:
        s = Series(np.asarray(x[0]), None if x[1] is None else np.asarray(x[1]), name=f"{etype}[{i}]")
    elif isinstance(x, np.ndarray):
        s = Series(x, name=f"{etype}[{i}]")
    else:
        raise TypeError(f"series.{etype}[{i}]: expected a Series, (values, mask) or an array, got {type(x).__name__}")
    v = np.asarray(s.values, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != n:
        raise ValueError(f"series.{etype}[{i}]: expected values of shape (time, {n}) for {n} sensors, "
                         f"got {v.shape}")
    if s.mask is not None and np.shape(s.mask) != v.shape:
        raise ValueError(f"series.{etype}[{i}]: mask shape {np.shape(s.mask)} != values shape {v.shape}")
    if not 0 <= s.warmup < max(len(v), 1):
        raise ValueError(f"series.{etype}[{i}]: warmup {s.warmup} must be in [0, {len(v)})")
    return replace(s, values=v, mask=None if s.mask is None else np.asarray(s.mask, dtype=bool))


def split_validation(series: Sequence[Series], val_fraction: float, warmup: int) -> tuple[list[Series], list[Series]]:
    """Hold back the last ``val_fraction`` of each series (in time) for validation; the validation series starts
    with up to ``warmup`` training steps that only build the state."""
    train, val = [], []
    for s in series:
        n = len(s)
        cut = n - int(round(n * val_fraction))
        if cut < 2 or cut >= n:
            train.append(s)
            continue
        w = min(warmup, cut)
        ts = s.timestamps
        train.append(Series(s.values[:cut], None if s.mask is None else s.mask[:cut], s.name,
                            None if ts is None else ts[:cut]))
        val.append(Series(s.values[cut - w:], None if s.mask is None else s.mask[cut - w:], s.name,
                          None if ts is None else ts[cut - w:], warmup=w))
    return train, val


def load_training_frames(store: str | Path, equipment_types: Mapping[str, EquipmentType],
                         train_until: datetime | None = None) -> dict[str, dict[str, pl.DataFrame]]:
    """Read the ingested store up to ``train_until`` (inclusive).

    Returns {type: {equipment: frame}}, frames sorted by time with ``timestamp``, the type's sensors (Float64) and
    ``<sensor>__missing`` (Boolean). Types without data in the store are left out.
    """
    store = Path(store)
    until = _as_utc(train_until) if train_until is not None else None
    out: dict[str, dict[str, pl.DataFrame]] = {}
    for tname, etype in equipment_types.items():
        for _, eq, start, end in store_index(store, equipment_type=tname):
            if until is not None:
                end = min(end, until.date())
            if start > end:
                continue
            df = read_range(store, etype, eq, start, end)
            if until is not None:
                df = df.filter(pl.col(TS) <= until)
            if df.height:
                out.setdefault(tname, {})[eq] = df.sort(TS)
    return out


def _segments(df: pl.DataFrame, sensors: Sequence[str], max_gap: int) -> list[tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray]]:
    """Cut a frame into contiguous grid spans: gaps up to ``max_gap`` grid steps become unobserved rows (the state
    carries across them); longer gaps start a new span. Returns [(values, mask, timestamps)]."""
    ts = df[TS].dt.replace_time_zone(None).to_numpy().astype("datetime64[us]")
    values, mask = frame_arrays(df, sensors)
    if len(ts) < 2:
        return [(values, mask, ts)]
    diffs = np.diff(ts).astype(np.int64)
    uniq, counts = np.unique(diffs[diffs > 0], return_counts=True)
    grid = int(uniq[counts.argmax()]) if uniq.size else 1  # the most common step: the source's grid
    steps = np.concatenate([[0], np.cumsum(np.maximum(diffs // grid, 1))])  # grid index of every row
    breaks = np.flatnonzero(np.diff(steps) > max_gap + 1) + 1
    out = []
    for idx in np.split(np.arange(len(ts)), breaks):
        pos = steps[idx] - steps[idx[0]]
        T = int(pos[-1]) + 1
        v = np.full((T, len(sensors)), np.nan)
        m = np.zeros((T, len(sensors)), dtype=bool)
        v[pos], m[pos] = values[idx], mask[idx]
        t = ts[idx[0]] + np.arange(T) * np.timedelta64(grid, "us")
        out.append((v, m, t))
    return out


def frames_to_series(frames: Mapping[str, Mapping[str, pl.DataFrame]], equipment_types: Mapping[str, EquipmentType],
                     cfg: TrainConfig) -> tuple[dict[str, list[Series]], dict[str, list[Series]], pl.DataFrame]:
    """Training and validation series per type, and the data ranges (one row per equipment).

    Validation = the last ``val_fraction`` of each equipment's observed rows, cut at one instant, plus up to
    ``window`` warm-up steps before it. Returns (train, val, ranges)."""
    train: dict[str, list[Series]] = {}
    val: dict[str, list[Series]] = {}
    rows = []
    for tname, by_eq in frames.items():
        sensors = equipment_types[tname].sensor_names
        for eq, df in by_eq.items():
            segs = _segments(df, sensors, max_gap=cfg.window)
            all_ts = df[TS].dt.replace_time_zone(None).to_numpy().astype("datetime64[us]")
            cut_ts = all_ts[min(len(all_ts) - 1, len(all_ts) - int(round(len(all_ts) * cfg.val_fraction)))]
            tr, va = [], []
            for k, (v, m, t) in enumerate(segs):
                name = eq if len(segs) == 1 else f"{eq}#{k}"
                cut = int(np.searchsorted(t, cut_ts))
                if cut >= 2:
                    tr.append(Series(v[:cut], m[:cut], name, t[:cut]))
                if cut < len(t):
                    w = min(cfg.window, cut) if cut >= 2 else 0
                    va.append(Series(v[cut - w:], m[cut - w:], name, t[cut - w:], warmup=w))
            train.setdefault(tname, []).extend(tr)
            val.setdefault(tname, []).extend(va)
            rows.append({
                "equipment_type": tname, "equipment": eq,
                "train_start": _ts(tr[0].timestamps[0]) if tr else None,
                "train_end": _ts(tr[-1].timestamps[-1]) if tr else None,
                "train_steps": sum(len(s) for s in tr),
                "val_start": _ts(va[0].timestamps[va[0].warmup]) if va else None,
                "val_end": _ts(va[-1].timestamps[-1]) if va else None,
                "val_steps": sum(len(s) - s.warmup for s in va),
            })
    schema = {"equipment_type": pl.String, "equipment": pl.String, "train_start": pl.Datetime("us", "UTC"),
              "train_end": pl.Datetime("us", "UTC"), "train_steps": pl.Int64, "val_start": pl.Datetime("us", "UTC"),
              "val_end": pl.Datetime("us", "UTC"), "val_steps": pl.Int64}
    return train, val, pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)


def _ts(t: np.datetime64) -> datetime:
    return datetime.fromtimestamp(t.astype("datetime64[us]").astype(np.int64) / 1e6, UTC)


# --- optimisation pieces --------------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices decay; A_log, D (marked ``_no_weight_decay``), norms, biases and embeddings
    do not. Each group carries the parameter ``names``."""
    skip: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower():
            skip.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = getattr(p, "_no_weight_decay", False) or p.ndim < 2 or id(p) in skip
        group = no_decay if plain else decay
        group[0].append(p)
        group[1].append(name)
    return [{"params": decay[0], "names": decay[1], "weight_decay": weight_decay},
            {"params": no_decay[0], "names": no_decay[1], "weight_decay": 0.0}]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WindowSampler:
    """Random training windows: every call returns, for every equipment type, ``batch_size`` windows of
    ``window`` steps (shorter when a type's longest series is shorter), at uniform random offsets over all of the
    type's series. Its random generator is separate and checkpointed."""

    def __init__(self, data: Mapping[str, Sequence[tuple[Tensor, Tensor]]], window: int, batch_size: int,
                 seed: int):
        self.data = {t: list(v) for t, v in data.items()}
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.windows: dict[str, int] = {}
        self.eligible: dict[str, np.ndarray] = {}
        self.weights: dict[str, np.ndarray] = {}
        for t, segs in self.data.items():
            lengths = np.array([s[0].shape[0] for s in segs])
            w = int(min(window, lengths.max()))
            ok = np.flatnonzero(lengths >= w)
            starts = lengths[ok] - w + 1
            self.windows[t], self.eligible[t], self.weights[t] = w, ok, starts / starts.sum()

    def tokens_per_step(self) -> int:
        return sum(self.batch_size * w for w in self.windows.values())

    def sample(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{type: (values, mask)}, each (batch_size, window, n_sensors); values normalised, 0 where missing."""
        out = {}
        for t, segs in self.data.items():
            w = self.windows[t]
            which = self.rng.choice(self.eligible[t], size=self.batch_size, p=self.weights[t])
            vs, ms = [], []
            for i in which:
                v, m = segs[i]
                o = int(self.rng.integers(0, v.shape[0] - w + 1))
                vs.append(v[o:o + w])
                ms.append(m[o:o + w])
            out[t] = (torch.stack(vs), torch.stack(ms))
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


def _rng_states(sampler: WindowSampler) -> str:
    """Python, numpy (global) and sampler RNG states as JSON (checkpoints load with weights_only=True)."""
    py = random.getstate()
    npg = np.random.get_state()
    return json.dumps({"python": [py[0], list(py[1]), py[2]],
                       "numpy": [npg[0], npg[1].tolist(), int(npg[2]), int(npg[3]), float(npg[4])],
                       "sampler": sampler.state_dict()})


def _set_rng_states(text: str, sampler: WindowSampler) -> None:
    d = json.loads(text)
    random.setstate((d["python"][0], tuple(d["python"][1]), d["python"][2]))
    n = d["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    sampler.load_state_dict(d["sampler"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- results --------------------------------------------------------------------------------------------------


@dataclass
class Validation:
    """Scores of the held-back period: NLL per observed value, per type and overall."""

    nll: float
    nll_by_type: dict[str, float]
    scores: dict[str, np.ndarray]        # type -> 1-D step scores (scored steps only)
    usage: dict[str, np.ndarray]         # type -> (n_layers, E) share of validation steps per expert
    surprise: dict[str, np.ndarray] = field(default_factory=dict)  # type -> the scores' surprise part
    novelty: dict[str, np.ndarray] = field(default_factory=dict)   # type -> novelty part (fitted models only)


@dataclass
class TrainResult:
    """What training returns: the detector, a per-epoch history and the routing usage per type."""

    detector: RoMDetector
    history: pl.DataFrame                # epoch, step, train_nll, aux_loss, val_nll, lr, seconds, steps/tokens per s
    routing_usage: dict[str, np.ndarray]  # type -> (n_layers, E); empty for a dense model
    val_scores: dict[str, np.ndarray]    # type -> validation scores (the threshold's input)
    metrics: dict[str, float]
    data_ranges: pl.DataFrame = field(default_factory=pl.DataFrame)
    val_surprise: dict[str, np.ndarray] = field(default_factory=dict)  # the scores' two parts, unstandardised
    val_novelty: dict[str, np.ndarray] = field(default_factory=dict)


HISTORY_SCHEMA = {"epoch": pl.Int64, "step": pl.Int64, "train_nll": pl.Float64, "aux_loss": pl.Float64,
                  "val_nll": pl.Float64, "lr": pl.Float64, "seconds": pl.Float64, "steps_per_s": pl.Float64,
                  "tokens_per_s": pl.Float64}


@torch.no_grad()
def validate(detector: RoMDetector, val: Mapping[str, Sequence[Series]], chunk_len: int = 4096) -> Validation:
    """Score every validation series in chunks with carried state; the warm-up steps are not counted."""
    total, count = 0.0, 0
    by_type, scores, usage, surprise, novelty = {}, {}, {}, {}, {}
    for t, items in val.items():
        t_sum, t_count, t_scores, t_surprise, t_novelty = 0.0, 0, [], [], []
        counts = None
        for s in items:
            r = detector.score(s.values, t, s.mask, chunk_len=chunk_len)
            w = s.warmup
            observed = s.observed()[w:].copy()
            if w == 0:
                observed[0] = False  # the very first step has no forecast
            t_sum += float(r.attribution[w:].sum())
            t_count += int(observed.sum())
            keep = r.scored[w:]
            t_scores.append(r.score[w:][keep])
            t_surprise.append(r.surprise[w:][keep])
            if r.novelty is not None:
                t_novelty.append(r.novelty[w:][keep])
            if r.top_experts is not None:
                top = r.top_experts[:, w:][:, keep]  # (n_layers, steps, K)
                E = detector.model.cfg.num_experts
                c = np.stack([np.bincount(layer.reshape(-1), minlength=E) for layer in top])
                counts = c if counts is None else counts + c
        total += t_sum
        count += t_count
        by_type[t] = t_sum / max(t_count, 1)
        scores[t] = np.concatenate(t_scores) if t_scores else np.zeros(0)
        surprise[t] = np.concatenate(t_surprise) if t_surprise else np.zeros(0)
        if t_novelty:
            novelty[t] = np.concatenate(t_novelty)
        if counts is not None:
            usage[t] = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    return Validation(total / max(count, 1), by_type, scores, usage, surprise, novelty)


@torch.no_grad()
def fit_novelty(detector: RoMDetector, train: Mapping[str, Sequence[Series]], skip: int, chunk_len: int = 4096
                ) -> None:
    """Fit each type's feature Gaussian on its training series (the first ``skip`` steps of each left out while the
    state fills up) into ``detector.novelty_``; train_detector then calibrates it on the validation steps."""
    for t, items in train.items():
        moments = None
        for s in items:
            moments = detector.feature_moments(s.values, t, s.mask, skip=min(skip, len(s) // 4), moments=moments,
                                               chunk_len=chunk_len)
        detector.novelty_[t] = NoveltyModel.fit(moments)


# --- the loop -------------------------------------------------------------------------------------------------


def _prepare(series: Mapping[str, Sequence[Series]], scalers: Mapping[str, RobustScaler], device: torch.device
             ) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """Normalised float32 values (0 where missing) and bool masks, per type, on ``device``."""
    out = {}
    for t, items in series.items():
        out[t] = []
        for s in items:
            obs = s.observed()
            x = np.where(obs, scalers[t].transform(np.where(obs, s.values, 0.0)), 0.0)
            out[t].append((torch.as_tensor(x, dtype=torch.float32, device=device),
                           torch.as_tensor(obs, device=device)))
    return out


def _fingerprint(data: Mapping[str, Sequence[tuple[Tensor, Tensor]]]) -> str:
    h = hashlib.sha1()
    for t in sorted(data):
        h.update(t.encode())
        for v, m in data[t]:
            h.update(v.cpu().numpy().tobytes())
            h.update(m.cpu().numpy().tobytes())
    return h.hexdigest()


def _config_record(model_cfg: RoMConfig, cfg: TrainConfig, sensors: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    train = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE}
    return {"model": model_cfg.to_dict(), "train": train, "sensors": {t: list(v) for t, v in sensors.items()}}


def _check_resumable(saved: dict[str, Any], now: dict[str, Any]) -> None:
    for part in ("model", "train"):
        for key in sorted(set(saved[part]) | set(now[part])):
            a, b = saved[part].get(key), now[part].get(key)
            if a != b:
                raise ValueError(f"checkpoint: {part}.{key} was {a!r} when the checkpoint was written, now {b!r} "
                                 f"(restore it, or train without --resume)")
    if saved["sensors"] != now["sensors"]:
        raise ValueError("checkpoint: the sensor lists changed since the checkpoint was written "
                         "(train without --resume)")


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def train_detector(
    series: Mapping[str, Sequence[SeriesLike]],
    sensors: Mapping[str, Sequence[str]],
    model_cfg: RoMConfig,
    cfg: TrainConfig,
    *,
    val_series: Mapping[str, Sequence[Series]] | None = None,
    resume: bool = False,
    progress: bool = False,
    info: Mapping[str, Any] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a detector on normal data.

    series: {type: [Series | (values (T, n), mask) | values]} in physical units, columns in the order of
    ``sensors[type]``. Without ``val_series`` the last ``cfg.val_fraction`` of each series is held back (in time)
    for validation, early stopping and thresholds; with it, ``series`` is all training data. ``resume`` continues
    from ``cfg.checkpoint_dir``/last.pt when it exists. ``on_step(step, loss)`` runs after each step (and after its
    checkpoint). ``info`` is merged into the detector's info.
    """
    if not series:
        raise ValueError("series: expected at least one equipment type with training data, got none")
    for t in series:
        if t not in sensors:
            raise ValueError(f"sensors: no sensor list for equipment type {t!r}")
    train = {t: [_as_series(x, t, i, len(sensors[t])) for i, x in enumerate(items)] for t, items in series.items()}
    if val_series is None:
        pairs = {t: split_validation(items, cfg.val_fraction, cfg.window) for t, items in train.items()}
        train = {t: p[0] for t, p in pairs.items()}
        val = {t: p[1] for t, p in pairs.items()}
    else:
        val = {t: [_as_series(x, t, i, len(sensors[t])) for i, x in enumerate(items)]
               for t, items in val_series.items() if t in train}
    for t, items in train.items():
        items[:] = [s for s in items if len(s) >= 2]
        if not items:
            raise ValueError(f"series.{t}: expected at least one training series of >= 2 steps, got none")
    if not any(val.values()):
        raise ValueError("validation: no held-back data (series too short for val_fraction, or val_series empty)")
    types = list(train)
    sensors = {t: list(sensors[t]) for t in types}

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    scalers = {t: RobustScaler.fit(np.concatenate([s.values for s in train[t]]),
                                   np.concatenate([s.observed() for s in train[t]])) for t in types}
    model = RoMForecaster(model_cfg, {t: len(sensors[t]) for t in types}).to(device)
    detector = RoMDetector(model, sensors, scalers)
    data = _prepare(train, scalers, device)
    sampler = WindowSampler(data, cfg.window, cfg.batch_size, cfg.seed)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext

    record = _config_record(model_cfg, cfg, sensors)
    fingerprint = _fingerprint(data)
    ckpt_path = Path(cfg.checkpoint_dir) / CHECKPOINT_FILE if cfg.checkpoint_dir else None
    step, best_val, best_epoch, bad_epochs, stopped, seconds = 0, math.inf, 0, 0, False, 0.0
    best_state: dict[str, Tensor] | None = None
    history: list[dict[str, Any]] = []
    acc = {"nll": 0.0, "aux": 0.0, "n": 0, "seconds": 0.0}
    resumed_from = None
    if resume and ckpt_path is not None and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt_path}: checkpoint format {ck.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        _check_resumable(json.loads(ck["config"]), record)
        if ck["fingerprint"] != fingerprint:
            raise ValueError(f"{ckpt_path}: the training data changed since the checkpoint was written "
                             f"(train without --resume)")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        _set_rng_states(ck["rng"], sampler)
        torch.set_rng_state(ck["torch_rng"].cpu())
        if device.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu(), device)
        state = json.loads(ck["state"])
        step, best_val, best_epoch, bad_epochs, stopped = (state["step"], state["best_val"], state["best_epoch"],
                                                           state["bad_epochs"], state["stopped"])
        seconds, history, acc = state["seconds"], state["history"], state["acc"]
        best_state = ck.get("best_model")
        resumed_from = step

    def save_checkpoint() -> None:
        if ckpt_path is None:
            return
        state = {"step": step, "best_val": best_val, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                 "stopped": stopped, "seconds": seconds, "history": history, "acc": acc}
        _save_atomic({
            "format": CHECKPOINT_FORMAT, "config": json.dumps(record), "fingerprint": fingerprint,
            "model": _cpu_state(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "best_model": best_state, "rng": _rng_states(sampler), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "state": json.dumps(state),
        }, ckpt_path)

    tokens = sampler.tokens_per_step()
    bar = _progress_bar(cfg.steps, step, progress)
    last_val = f", val {history[-1]['val_nll']:.3f}" if history else ""
    while step < cfg.steps and not stopped:
        t0 = time.perf_counter()
        model.train()
        batches = sampler.sample()
        outs = []
        with autocast():
            for t in types:
                v, m = batches[t]
                out, _ = model(v, m, t)
                outs.append(out)
            nll = torch.stack([o.forecast_loss().float() for o in outs]).mean()
            aux = model.aux_loss(*[o.routing for o in outs]).float()
        loss = nll + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        dt = time.perf_counter() - t0
        seconds += dt
        # one read-back for the three numbers (each float() of a GPU tensor waits for the device)
        loss_value, nll_value, aux_value = torch.stack([loss.detach(), nll.detach(), aux.detach()]).tolist()
        if not math.isfinite(loss_value):       # raised before anything is saved: the last checkpoint stays good
            raise ValueError(
                f"training step {step}: the loss is not finite (forecast NLL {nll_value}, routing loss {aux_value}): "
                f"the model diverged; lower train.lr (now {cfg.lr:g}) or lengthen train.warmup_steps "
                f"(now {cfg.warmup_steps}), and look for extreme values in the training data")
        acc = {"nll": acc["nll"] + nll_value, "aux": acc["aux"] + aux_value, "n": acc["n"] + 1,
               "seconds": acc["seconds"] + dt}
        if step % cfg.steps_per_epoch == 0 or step == cfg.steps:
            v0 = time.perf_counter()
            vres = validate(detector, val, cfg.score_chunk)
            seconds += time.perf_counter() - v0
            epoch = len(history) + 1
            history.append({
                "epoch": epoch, "step": step, "train_nll": acc["nll"] / acc["n"], "aux_loss": acc["aux"] / acc["n"],
                "val_nll": vres.nll, "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
                "steps_per_s": acc["n"] / acc["seconds"], "tokens_per_s": acc["n"] * tokens / acc["seconds"]})
            acc = {"nll": 0.0, "aux": 0.0, "n": 0, "seconds": 0.0}
            if vres.nll < best_val - cfg.min_delta:
                best_val, best_epoch, bad_epochs, best_state = vres.nll, epoch, 0, _cpu_state(model)
            else:
                bad_epochs += 1
                stopped = cfg.patience > 0 and bad_epochs >= cfg.patience
            last_val = f", val {vres.nll:.3f}"
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopped:
            save_checkpoint()
        bar.set_description(f"loss {loss_value:.3f}", refresh=False)
        bar.set_postfix_str(f"{1 / dt:.2f} steps/s, {tokens / dt:,.0f} tok/s{last_val}", refresh=False)
        bar.update(1)
        if on_step is not None:
            on_step(step, loss_value)
    bar.close()

    if best_state is not None:
        model.load_state_dict(best_state)
    fit_novelty(detector, train, cfg.window, cfg.score_chunk)
    final = validate(detector, val, cfg.score_chunk)
    for t in types:
        if t in final.novelty:  # standardise both parts on the held-back normal steps, then score them
            detector.novelty_[t].calibrate(final.surprise[t], final.novelty[t])
            final.scores[t] = detector.novelty_[t].combine(final.surprise[t], final.novelty[t])
        s = final.scores.get(t, np.zeros(0))
        s = s[np.isfinite(s)]
        if s.size:
            detector.threshold_[t] = fit_threshold(s, method=cfg.threshold_method, q=cfg.threshold_q)

    hist = pl.DataFrame(history, schema=HISTORY_SCHEMA, orient="row") if history else pl.DataFrame(
        schema=HISTORY_SCHEMA)
    params = count_parameters(model_cfg, {t: len(sensors[t]) for t in types})[-1]
    metrics = {
        "val_nll": final.nll, **{f"val_nll.{t}": v for t, v in final.nll_by_type.items()},
        "train_nll": float(hist["train_nll"][-1]) if hist.height else math.nan,
        "best_epoch": float(best_epoch), "epochs": float(hist.height), "steps": float(step),
        "stopped_early": float(stopped and step < cfg.steps), "train_seconds": seconds,
        "tokens_per_s": float(hist["tokens_per_s"].mean()) if hist.height else math.nan,
        "params_total": float(params.total), "params_active": float(params.active),
        **{f"threshold.{t}": v for t, v in detector.threshold_.items()},
    }
    detector.info.update({
        "metrics": metrics,
        "train_config": cfg.to_dict(),
        "sensors": sensors,
        "routing_usage": {t: u.round(4).tolist() for t, u in final.usage.items()},
        "val_steps": {t: int(s.size) for t, s in final.scores.items()},
        "resumed_from_step": resumed_from,
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **dict(info or {}),
    })
    missing = [t for t in types if t not in detector.threshold_]
    if missing:
        detector.info["types_without_threshold"] = missing
    model.eval()
    return TrainResult(detector, hist, final.usage, final.scores, metrics, val_surprise=final.surprise,
                       val_novelty=final.novelty)


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, leave=True)


# --- from a plant ---------------------------------------------------------------------------------------------


def train_from_store(plant: PlantConfig, model_cfg: RoMConfig | None = None, cfg: TrainConfig | None = None, *,
                     types: Iterable[str] | None = None, resume: bool = False, progress: bool = False,
                     on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train on a plant's ingested store: [model] and [train] tables unless given; ``types`` restricts the
    equipment types (default: every type with data up to ``train_until``)."""
    model_cfg = model_cfg or RoMConfig.from_dict(plant.model)
    cfg = cfg or TrainConfig.from_dict(plant.train)
    etypes = {t: e for t, e in plant.equipment_types.items() if types is None or t in set(types)}
    frames = load_training_frames(plant.store, etypes, cfg.train_until)
    if not frames:
        until = f" up to {cfg.train_until.isoformat()}" if cfg.train_until else ""
        raise ValueError(f"{plant.store}: no ingested data{until} for equipment types {', '.join(etypes)} "
                         f"(run `rmamba ingest` first)")
    train, val, ranges = frames_to_series(frames, etypes, cfg)
    sensors = {t: etypes[t].sensor_names for t in train}
    skipped = sorted(set(etypes) - set(train))
    info = {"plant": plant.name, "data_ranges": ranges.with_columns(pl.selectors.datetime().dt.to_string(
        "%Y-%m-%dT%H:%M:%SZ")).to_dicts(), "types_without_data": skipped}
    result = train_detector(train, sensors, model_cfg, cfg, val_series=val, resume=resume, progress=progress,
                            info=info, on_step=on_step)
    result.data_ranges = ranges
    return result


__all__ = [
    "TrainConfig", "Series", "TrainResult", "Validation", "WindowSampler", "frames_to_series",
    "load_training_frames", "lr_factor", "param_groups", "resolve_device", "seed_everything", "split_validation",
    "train_detector", "train_from_store", "validate",
]
