"""The trained detector: forecaster + per-sensor scalers + label-free thresholds, scored in chunks.

Forecaster -> scorer -> detector, as a composition (STYLE.md): `RoMForecaster` forecasts each next step,
`RoMDetector.score` turns one equipment's readings into a per-step anomaly score, per-sensor attribution (the
per-sensor NLL terms) and the experts that fired, and `threshold_` (per equipment type, fitted on held-back normal
data) turns scores into flags.

The score has two parts. Surprise: the forecast NLL summed over observed sensors (fast changes: spikes,
oscillation, a broken relation at its onset). Novelty (`NoveltyModel`): how far the model's features -- its own
summary of the recent past -- are from those of the training data (sustained changes: a next-step forecaster
adapts to a new level or a closed valve within a few steps, so its surprise falls back while the machine is still
abnormal; the features of the new regime stay away from the normal ones). Each part is standardised by its median
and IQR on held-back normal data and the two are added. A detector without a fitted novelty model (during
training, or saved by an older version) scores surprise alone.

This is the one object that training produces, the registry stores, and scoring / evaluation load. It is
saved as a folder: ``weights.pt`` (a state_dict, loaded with weights_only=True) and ``detector.json``
(config, sensor lists, scalers, thresholds). Streaming state is serialised with `state_to_bytes` so the
application can keep it in its database and resume tomorrow exactly where today stopped.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from rmamba import ForecasterState, ForecastOutput, LayerState, RoMConfig, RoMForecaster

if TYPE_CHECKING:  # polars is imported where frames are used: rmamba-only machines can still score arrays
    import polars as pl

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no novelty model (scores are surprise alone)
WEIGHTS_FILE = "weights.pt"
META_FILE = "detector.json"
MISSING_SUFFIX = "__missing"  # store flag column: True = no observation (the value may be forward-filled)
ATTRIBUTION_PREFIX = "attr__"  # score_frame output: per-sensor NLL term


@dataclass
class RobustScaler:
    """Per-sensor robust normalisation: (x - median) / scale, scale = IQR / 1.349 (the normal's sigma)."""

    median_: np.ndarray  # (n_sensors,)
    scale_: np.ndarray   # (n_sensors,)

    @classmethod
    def fit(cls, values: np.ndarray, mask: np.ndarray | None = None, min_scale: float = 1e-6,
            std_floor: float = 0.0) -> RobustScaler:
        """values (T, n) with NaN or mask=False where missing. A sensor never observed gets median 0, scale 1.
        A constant sensor (IQR 0) falls back to its std, then to 1e-3 of its magnitude, then to 1.
        ``std_floor`` > 0 floors the scale at that multiple of the sensor's std: quantised sensors (a value
        that sits on one level most of the time and steps by a lot) have an IQR far below their real spread."""
        x = _masked(values, mask)
        n = x.shape[1]
        med, scale = np.zeros(n), np.ones(n)
        for j in range(n):
            col = x[:, j][np.isfinite(x[:, j])]
            if col.size == 0:
                continue
            med[j] = float(np.median(col))
            q75, q25 = np.percentile(col, [75, 25])
            s = max((q75 - q25) / 1.349, std_floor * float(np.std(col)))
            if not s > min_scale:
                s = float(np.std(col))
            if not s > min_scale:
                s = max(abs(med[j]) * 1e-3, 1.0)
            scale[j] = s
        return cls(med, scale)

    def transform(self, values: np.ndarray) -> np.ndarray:
        return (values - self.median_) / self.scale_

    def to_dict(self) -> dict:
        return {"median": self.median_.tolist(), "scale": self.scale_.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> RobustScaler:
        return cls(np.asarray(d["median"], dtype=np.float64), np.asarray(d["scale"], dtype=np.float64))


def _masked(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """values (T, n) as float64 with NaN where mask is False (mask None: keep NaN as the only missing)."""
    x = np.array(values, dtype=np.float64, copy=True)
    if x.ndim != 2:
        raise ValueError(f"values: expected shape (time, n_sensors), got {x.shape}")
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != x.shape:
            raise ValueError(f"mask: expected the shape of values {x.shape}, got {m.shape}")
        x[~m] = np.nan
    return x


def frame_arrays(frame: pl.DataFrame, sensors: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Sensor columns of a frame -> values (T, n) float64 with NaN where unobserved, mask (T, n) bool observed.

    Null / NaN is unobserved, and so is a reading whose ``<sensor>__missing`` flag (store layout) is True or null,
    even when the store forward-filled its value."""
    import polars as pl

    values = frame.select([pl.col(s).cast(pl.Float64) for s in sensors]).to_numpy().astype(np.float64, copy=True)
    mask = np.isfinite(values)
    for j, s in enumerate(sensors):
        if s + MISSING_SUFFIX in frame.columns:
            mask[:, j] &= ~frame[s + MISSING_SUFFIX].cast(pl.Boolean).fill_null(True).to_numpy()
    values[~mask] = np.nan
    return values, mask


class FeatureMoments:
    """Running first and second moments of feature vectors (float64), so a Gaussian can be fitted on a training
    period of any length without holding its features."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = np.zeros(dim)
        self.outer = np.zeros((dim, dim))

    def add(self, feats: np.ndarray) -> None:
        f = np.asarray(feats, dtype=np.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def gaussian(self, ridge: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
        """(mean, precision); ``ridge`` is added to the covariance's diagonal (features that never vary)."""
        if self.n < 2:
            raise ValueError(f"features: expected at least 2 training steps to fit the novelty model, got {self.n}")
        mean = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        return mean, np.linalg.inv(cov + ridge * np.eye(len(mean)))


def _center_scale(x: np.ndarray) -> tuple[float, float]:
    """Median and IQR of the finite values (scale floored so that a constant part cannot divide by zero)."""
    x = x[np.isfinite(x)]
    if x.size == 0:
        return 0.0, 1.0
    q25, q50, q75 = np.percentile(x, [25, 50, 75])
    return float(q50), float(max(q75 - q25, 1e-6 * max(abs(q50), 1.0), 1e-12))


@dataclass
class NoveltyModel:
    """One equipment type's feature Gaussian (fitted on training data) and the standardisation of both score
    parts (fitted on held-back normal data). novelty = half the squared Mahalanobis distance of the features;
    score = (surprise - surprise_center) / surprise_scale + (novelty - novelty_center) / novelty_scale."""

    mean_: np.ndarray       # (d_model,)
    precision_: np.ndarray  # (d_model, d_model)
    surprise_center_: float = 0.0
    surprise_scale_: float = 1.0
    novelty_center_: float = 0.0
    novelty_scale_: float = 1.0

    @classmethod
    def fit(cls, moments: FeatureMoments) -> NoveltyModel:
        return cls(*moments.gaussian())

    def novelty(self, feats: np.ndarray | torch.Tensor) -> np.ndarray:
        """feats (L, d_model), numpy or torch (computed where the tensor is, in float64) -> (L,) novelty."""
        f = torch.as_tensor(feats).to(torch.float64)
        d = f - torch.as_tensor(self.mean_, device=f.device)
        return (0.5 * ((d @ torch.as_tensor(self.precision_, device=f.device)) * d).sum(-1)).cpu().numpy()

    def calibrate(self, surprise: np.ndarray, novelty: np.ndarray) -> None:
        """Standardise both parts by their median and IQR on normal (held-back) steps."""
        self.surprise_center_, self.surprise_scale_ = _center_scale(np.asarray(surprise, dtype=np.float64))
        self.novelty_center_, self.novelty_scale_ = _center_scale(np.asarray(novelty, dtype=np.float64))

    def combine(self, surprise: np.ndarray, novelty: np.ndarray) -> np.ndarray:
        return ((surprise - self.surprise_center_) / self.surprise_scale_
                + (novelty - self.novelty_center_) / self.novelty_scale_)

    def to_dict(self) -> dict:
        return {"mean": self.mean_.tolist(), "precision": self.precision_.tolist(),
                "surprise": [self.surprise_center_, self.surprise_scale_],
                "novelty": [self.novelty_center_, self.novelty_scale_]}

    @classmethod
    def from_dict(cls, d: dict) -> NoveltyModel:
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["precision"], dtype=np.float64),
                   *map(float, d["surprise"]), *map(float, d["novelty"]))


@dataclass
class ScoreResult:
    """One equipment's scores over a span of L steps."""

    score: np.ndarray        # (L,) anomaly score (module docstring); NaN where nothing was scored
    attribution: np.ndarray  # (L, n_sensors) per-sensor NLL terms (0 where not scored)
    scored: np.ndarray       # (L,) bool: at least one sensor observed and forecast
    top_experts: np.ndarray | None  # (n_layers, L, K) int16 experts chosen per step; None for a dense model
    state: ForecasterState | None = field(repr=False, default=None)
    surprise: np.ndarray | None = None  # (L,) forecast NLL summed over observed sensors; NaN where not scored
    novelty: np.ndarray | None = None   # (L,) feature novelty; None without a fitted novelty model


class RoMDetector:
    """A trained forecaster with its scalers and thresholds. Learned state ends in an underscore."""

    def __init__(self, model: RoMForecaster, sensors: dict[str, list[str]], scalers: dict[str, RobustScaler],
                 thresholds: dict[str, float] | None = None, info: dict | None = None,
                 novelty: dict[str, NoveltyModel] | None = None):
        if set(sensors) != set(model.equipment_types):
            raise ValueError(f"sensors: expected the model's equipment types {sorted(model.equipment_types)}, "
                             f"got {sorted(sensors)}")
        for t, names in sensors.items():
            if len(names) != model.equipment_types[t]:
                raise ValueError(f"sensors.{t}: the model has {model.equipment_types[t]} inputs, got {len(names)} "
                                 f"names")
        self.model = model
        self.sensors = {t: list(v) for t, v in sensors.items()}
        self.scalers_ = dict(scalers)
        self.threshold_ = dict(thresholds or {})
        self.novelty_ = dict(novelty or {})  # per type; fitted after training (pipelines.train)
        self.info = dict(info or {})  # free-form: training metrics, data ranges, versions

    # -- scoring --------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check_sensors(self, equipment_type: str, columns: list[str]) -> None:
        """Raise ValueError naming the missing sensors when a frame lacks some of the model's sensors."""
        if equipment_type not in self.sensors:
            raise ValueError(f"equipment_type: unknown type {equipment_type!r}; the model knows "
                             f"{', '.join(sorted(self.sensors))}")
        missing = [s for s in self.sensors[equipment_type] if s not in columns]
        if missing:
            raise ValueError(f"equipment type {equipment_type!r}: the model expects sensors "
                             f"{self.sensors[equipment_type]}; missing from the data: {missing}")

    @torch.no_grad()
    def score(self, values: np.ndarray, equipment_type: str, mask: np.ndarray | None = None,
              state: ForecasterState | None = None, chunk_len: int = 4096) -> ScoreResult:
        """Score one equipment's readings in chunks with carried state.

        values (L, n_sensors) in physical units, NaN (or mask False) where missing; columns in the order of
        ``self.sensors[equipment_type]``. Memory is bounded by ``chunk_len``, not L. Pass the returned
        ``state`` to the next call to continue exactly (streaming).
        """
        chunks = self._chunks(values, equipment_type, mask, state, chunk_len)  # validates before anything is allocated
        n = len(self.sensors[equipment_type])
        L = np.shape(values)[0]
        nov_model = self.novelty_.get(equipment_type)
        surprise = np.full(L, np.nan)
        novelty = None if nov_model is None else np.full(L, np.nan)
        attr = np.zeros((L, n))
        scored = np.zeros(L, dtype=bool)
        experts: list[np.ndarray] = []
        for s, out, after in chunks:
            state = after
            sc = out.scored[0].any(-1).cpu().numpy()
            nll = out.nll[0].double().cpu().numpy()
            bad = sc & ~np.isfinite(nll).all(-1)
            if bad.any():   # the GPU path runs the scan without its input checks: non-finite results stop here
                raise ValueError(
                    f"{equipment_type}: the model's forecast is not finite at step {s + int(np.argmax(bad))} of this "
                    "call (non-finite weights, or a model that diverged in training): retrain or restore the model")
            attr[s:s + chunk_len] = nll
            scored[s:s + chunk_len] = sc
            surprise[s:s + chunk_len] = np.where(sc, nll.sum(-1), np.nan)
            if novelty is not None:
                novelty[s:s + chunk_len] = np.where(sc, nov_model.novelty(out.features[0]), np.nan)
            if out.routing and out.routing[0].top_experts is not None:
                experts.append(np.stack([r.top_experts[0].cpu().numpy().astype(np.int16) for r in out.routing]))
        top = np.concatenate(experts, axis=1) if experts else None
        score = surprise if novelty is None else nov_model.combine(surprise, novelty)
        return ScoreResult(score, attr, scored, top, state, surprise, novelty)

    @torch.no_grad()
    def feature_moments(self, values: np.ndarray, equipment_type: str, mask: np.ndarray | None = None,
                        skip: int = 0, moments: FeatureMoments | None = None, chunk_len: int = 4096
                        ) -> FeatureMoments:
        """Accumulate the model's features over one series (physical units, as for `score`), leaving out the
        first ``skip`` steps (the state is still filling up there); returns ``moments`` (new when None)."""
        moments = moments if moments is not None else FeatureMoments(self.model.cfg.d_model)
        for s, out, _ in self._chunks(values, equipment_type, mask, None, chunk_len):
            f = out.features[0].double().cpu().numpy()
            keep = max(skip - s, 0)
            if keep < f.shape[0]:
                moments.add(f[keep:])
        return moments

    def _chunks(self, values: np.ndarray, equipment_type: str, mask: np.ndarray | None,
                state: ForecasterState | None, chunk_len: int
                ) -> Iterator[tuple[int, ForecastOutput, ForecasterState]]:
        """Validate and normalise one equipment's readings (here, at call time), then return an iterator that runs
        the model chunk by chunk with carried state: (first step of the chunk, its outputs, the state after it)."""
        if equipment_type not in self.scalers_:
            raise ValueError(f"equipment_type: unknown type {equipment_type!r}; the model knows "
                             f"{', '.join(sorted(self.scalers_))}")
        x = _masked(values, mask)
        n = len(self.sensors[equipment_type])
        if x.shape[1] != n:
            raise ValueError(f"values: expected {n} sensor columns for {equipment_type!r} "
                             f"({self.sensors[equipment_type]}), got {x.shape[1]}")
        x = self.scalers_[equipment_type].transform(x)
        if chunk_len < 1:
            raise ValueError(f"chunk_len: expected >= 1, got {chunk_len}")
        self.model.eval()
        dtype = next(self.model.parameters()).dtype

        def run(state: ForecasterState | None) -> Iterator[tuple[int, ForecastOutput, ForecasterState]]:
            for s in range(0, x.shape[0], chunk_len):
                xt = torch.as_tensor(x[s:s + chunk_len], dtype=dtype, device=self.device)[None]
                out, state = self.model(torch.nan_to_num(xt), torch.isfinite(xt), equipment_type, state)
                yield s, out, state

        return run(state)

    def score_frame(self, frame: pl.DataFrame, equipment_type: str | None = None, *, chunk_len: int = 4096
                    ) -> pl.DataFrame:
        """Score readings given as a polars frame; one equipment, or several told apart by an ``equipment`` column
        (each scored from a fresh state).

        Input columns: the type's sensors (physical units; null/NaN = missing), optionally ``<sensor>__missing``,
        ``timestamp`` (rows are scored in its order), ``equipment`` and ``equipment_type`` (read when the
        argument is None). Output, one row per input row: ``timestamp`` / ``equipment`` when given,
        ``equipment_type``, ``score`` (NaN where nothing was scored), ``flag`` (score above the type's threshold;
        null when none was fitted) and ``attr__<sensor>`` (that sensor's NLL term; 0 where not observed).
        """
        import polars as pl

        if not isinstance(frame, pl.DataFrame):
            raise TypeError(f"frame: expected a polars DataFrame, got {type(frame).__name__}")
        etype = equipment_type
        if not etype:
            if "equipment_type" not in frame.columns:
                raise ValueError("equipment_type: not given, and the frame has no 'equipment_type' column")
            found = frame["equipment_type"].drop_nulls().unique(maintain_order=True).to_list()
            if len(found) != 1:
                raise ValueError(f"equipment_type column: expected exactly one type per frame, got {found}")
            etype = str(found[0])
        self.check_sensors(etype, frame.columns)
        if "equipment" in frame.columns and frame["equipment"].n_unique() > 1:
            parts = frame.partition_by("equipment", maintain_order=True)
            return pl.concat([self.score_frame(p, etype, chunk_len=chunk_len) for p in parts])
        if "timestamp" in frame.columns:
            frame = frame.sort("timestamp", maintain_order=True)
        names = self.sensors[etype]
        values, mask = frame_arrays(frame, names)
        r = self.score(values, etype, mask, chunk_len=chunk_len)
        flag = (pl.Series("flag", self.flags(r.score, etype)) if etype in self.threshold_
                else pl.Series("flag", [None] * frame.height, dtype=pl.Boolean))
        keep = [c for c in ("timestamp", "equipment") if c in frame.columns]
        return frame.select(keep).with_columns(
            pl.lit(etype, pl.String).alias("equipment_type"),
            pl.Series("score", r.score, dtype=pl.Float64),
            flag,
            *[pl.Series(ATTRIBUTION_PREFIX + n, r.attribution[:, j], dtype=pl.Float64) for j, n in enumerate(names)],
        )

    def flags(self, score: np.ndarray, equipment_type: str) -> np.ndarray:
        """Boolean flags: score above the type's label-free threshold (NaN scores are never flagged)."""
        if equipment_type not in self.threshold_:
            raise ValueError(f"threshold_: no threshold fitted for equipment type {equipment_type!r}")
        return np.nan_to_num(score, nan=-np.inf) > self.threshold_[equipment_type]

    # -- persistence ----------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write weights.pt and detector.json into ``folder`` (created); returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, folder / WEIGHTS_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "model_config": self.model.cfg.to_dict(),
            "sensors": self.sensors,
            "scalers": {t: s.to_dict() for t, s in self.scalers_.items()},
            "thresholds": self.threshold_,
            "novelty": {t: m.to_dict() for t, m in self.novelty_.items()},
            "info": self.info,
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        return folder

    @classmethod
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> RoMDetector:
        folder = Path(folder)
        meta_path = folder / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path}: no detector here (expected {META_FILE} and {WEIGHTS_FILE})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"{meta_path}: format_version expected one of {READABLE_VERSIONS}, got "
                             f"{meta.get('format_version')}")
        sensors = {t: list(v) for t, v in meta["sensors"].items()}
        model = RoMForecaster(RoMConfig.from_dict(meta["model_config"]), {t: len(v) for t, v in sensors.items()})
        weights = torch.load(folder / WEIGHTS_FILE, map_location=map_location, weights_only=True)
        model.load_state_dict(weights)
        model.to(map_location).eval()
        scalers = {t: RobustScaler.from_dict(d) for t, d in meta["scalers"].items()}
        novelty = {t: NoveltyModel.from_dict(d) for t, d in meta.get("novelty", {}).items()}
        return cls(model, sensors, scalers, {t: float(v) for t, v in meta["thresholds"].items()}, meta.get("info"),
                   novelty)


def state_to_bytes(state: ForecasterState) -> bytes:
    """Serialise a streaming state (tensors only; loadable with weights_only=True)."""
    payload = {
        "equipment_type": state.equipment_type,
        "conv": [s.conv.detach().cpu() for s in state.layers],
        "ssm": [s.ssm.detach().cpu() for s in state.layers],
        "mean": None if state.mean is None else state.mean.detach().cpu(),
        "scale": None if state.scale is None else state.scale.detach().cpu(),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def state_from_bytes(blob: bytes, map_location: str | torch.device = "cpu") -> ForecasterState:
    """Inverse of `state_to_bytes`."""
    p = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
    layers = [LayerState(c, s) for c, s in zip(p["conv"], p["ssm"])]
    return ForecasterState(p["equipment_type"], layers, p["mean"], p["scale"])
