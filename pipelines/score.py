"""The scoring stage: one equipment's new store rows -> scores, alerts, display series, expert usage, next state.

Pure (no database, no MLflow): the application passes the detector, the frame read from the store and the state
saved by the previous run; it persists what comes back. ROM_SPEC section 4: rows are scored in chunks with the
model's (conv, scan) state carried across chunks and across runs, so scoring day 1 then day 2 gives what scoring
both days at once gives, alerts included.

    ScoreConfig       the [score] table of plant.toml (validated; errors name key, expected, found)
    score_equipment   the stage: frame (+ state bytes) -> ScoreOutput (frames, report, state bytes, scored_until)
    extract_alerts    flagged steps -> alerts (min length, merge gap, top sensors, experts), carried across windows
    stream_score      the streaming entry point: an iterator of (L, n) chunks -> ScoreResult per chunk, memory flat
                      in the total length (torch + numpy only: runs where polars is not installed)

Grid and gaps: rows are put on the equipment's grid; gaps of up to ``max_gap_steps`` grid steps become unobserved
rows (the model steps through them), longer gaps restart the model from a fresh state. After a fresh start the
first ``warmup_steps`` steps only warm the state up: they are not reported (a model without context forecasts
badly and would raise false alerts).

Alerts (ROM_SPEC section 3): runs of flagged steps (score > the type's threshold) closer than ``merge_gap_steps``
unflagged steps are merged; an alert spanning fewer than ``min_alert_steps`` grid steps (start to end inclusive)
is dropped. An alert still running at the end of the window (or within ``merge_gap_steps`` of it) is reported
with ``open = True`` and carried in the state: the next window extends it under the same start, so the
application's key (equipment, start, model version) stays stable.

Severity: the score is a negative log-likelihood (nats), so ``peak - threshold`` is the log-likelihood ratio of
the peak reading against a threshold-level one; a peak/threshold ratio would be meaningless because NLL
thresholds can be zero or negative. Bands (``severity_nats``, default 2, 5, 10): excess < 2 nats -> low
(under ~7x less likely than a threshold event), < 5 -> medium (~150x), < 10 -> high (~22,000x), else critical.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.config import parse_duration
from pipelines.detector import (
    ATTRIBUTION_PREFIX,
    MISSING_SUFFIX,
    RoMDetector,
    ScoreResult,
    state_from_bytes,
    state_to_bytes,
)

if TYPE_CHECKING:  # polars is imported where frames are built: stream_score runs with torch + numpy only
    import polars as pl

    from rmamba import ForecasterState

SEVERITIES = ("low", "medium", "high", "critical")
TS = "timestamp"
DAY_US = 86_400_000_000
STATE_MAGIC = b"RMSCORE1"  # state bytes: magic, 8-byte header length, JSON header, model state (torch.save)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NOT_SENSORS = {TS, "equipment", "equipment_type", "date"}


# --- configuration -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreConfig:
    """The [score] table of plant.toml; every key optional."""

    chunk_len: int = 4096            # steps per model call (memory is bounded by this, not by the window)
    min_alert_steps: int = 3         # an alert spans at least this many grid steps (start..end inclusive)
    merge_gap_steps: int = 5         # flagged runs separated by at most this many unflagged steps merge
    downsample: str = "15m"          # bucket of the display series (per-bucket mean and max of the score)
    warmup_steps: int = 256          # steps after a fresh start that warm the model up and are not reported
    max_gap_steps: int = 60          # longer gaps in the data restart the model (shorter ones are stepped through)
    window_days: int = 7             # the application scores and commits at most this many store days at a time
    severity_nats: tuple[float, float, float] = (2.0, 5.0, 10.0)  # peak - threshold at which medium/high/critical
    top_sensors: int = 3             # sensors listed per alert (by attribution summed over the alert)
    top_experts: int = 3             # experts listed per layer and alert (by share of the alert's steps)

    def __post_init__(self) -> None:
        for name, lo in (("chunk_len", 1), ("min_alert_steps", 1), ("merge_gap_steps", 0), ("warmup_steps", 0),
                         ("max_gap_steps", 0), ("window_days", 1), ("top_sensors", 1), ("top_experts", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"score.{name}: expected an integer >= {lo}, got {value!r}")
        if not isinstance(self.downsample, str):
            raise ValueError(f"score.downsample: expected a duration such as '15m', got {self.downsample!r}")
        try:
            parse_duration(self.downsample)
        except ValueError as exc:
            raise ValueError(f"score.downsample: {exc}") from None
        bands = self.severity_nats
        ok = (isinstance(bands, list | tuple) and len(bands) == 3
              and all(isinstance(b, int | float) and not isinstance(b, bool) and math.isfinite(b) for b in bands)
              and 0 <= bands[0] <= bands[1] <= bands[2])
        if not ok:
            raise ValueError(f"score.severity_nats: expected three increasing numbers >= 0 such as [2.0, 5.0, 10.0], "
                             f"got {bands!r}")
        object.__setattr__(self, "severity_nats", tuple(float(b) for b in bands))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ScoreConfig:
        """Build from the TOML [score] table (None or empty: defaults); unknown keys are an error naming them."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"score: expected a table, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"score.{unknown[0]}: unknown key (expected one of: {', '.join(known)})")
        return cls(**dict(d))

    @property
    def bucket_us(self) -> int:
        return int(parse_duration(self.downsample) / timedelta(microseconds=1))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["severity_nats"] = list(self.severity_nats)
        return d


def severity(peak: float, threshold: float, bands: tuple[float, float, float] = (2.0, 5.0, 10.0)) -> str:
    """Severity of an alert from its peak score's excess over the threshold, in nats (module docstring)."""
    excess = peak - threshold
    return SEVERITIES[int(np.searchsorted(np.asarray(bands), excess, side="right"))]


class ScoringDataError(ValueError):
    """The model and an equipment's data do not fit together. ``reason`` is one of: equipment_type, threshold,
    sensors, history, all_missing, state."""

    def __init__(self, equipment_type: str, equipment: str, reason: str, detail: str):
        self.equipment_type, self.equipment, self.reason, self.detail = equipment_type, equipment, reason, detail
        super().__init__(f"equipment {equipment!r} ({equipment_type}): {detail}")


# --- what is carried from one window to the next -----------------------------------------------------------


@dataclass
class PendingAlert:
    """An alert that may still grow: stats over its span so far and over the unflagged tail after its end."""

    start: int                 # µs since the epoch (UTC) of the first flagged step
    end: int                   # µs of the last flagged step
    peak: float
    peak_at: int
    flagged: int               # flagged steps in the span
    steps: int                 # reported rows in the span
    attr: np.ndarray           # (n_sensors,) attribution summed over the span
    experts: np.ndarray        # (n_layers, E) top-K slots per expert over the span (0 x 0 for a dense model)
    tail_steps: int = 0        # reported rows after ``end`` (join the span only if another run merges)
    tail_attr: np.ndarray | None = None
    tail_experts: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("start", "end", "peak", "peak_at", "flagged", "steps", "tail_steps")}
        d.update(attr=self.attr.tolist(), experts=self.experts.tolist(),
                 tail_attr=None if self.tail_attr is None else self.tail_attr.tolist(),
                 tail_experts=None if self.tail_experts is None else self.tail_experts.tolist())
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PendingAlert:
        def arr(v: Any, dtype: type) -> np.ndarray | None:
            return None if v is None else np.asarray(v, dtype=dtype)

        return cls(int(d["start"]), int(d["end"]), float(d["peak"]), int(d["peak_at"]), int(d["flagged"]),
                   int(d["steps"]), arr(d["attr"], np.float64), arr(d["experts"], np.int64), int(d["tail_steps"]),
                   arr(d["tail_attr"], np.float64), arr(d["tail_experts"], np.int64))


@dataclass
class ScoreCarry:
    """Everything the next window needs: the model's streaming state and the partial aggregates at the edge."""

    equipment_type: str
    grid_us: int
    scored_until: int                          # µs of the last row consumed (reported or warm-up)
    warmup_left: int = 0                       # warm-up steps still to go after the last fresh start
    reported: int = 0                          # steps reported since the first start (0: never got past warm-up)
    model: ForecasterState | None = None
    alert: PendingAlert | None = None
    bucket: dict[str, Any] | None = None       # {start, sum, count, max, flagged} of the last display bucket
    day: dict[str, Any] | None = None          # {day, steps, counts (n_layers x E)} of the last expert-usage day

    def to_bytes(self) -> bytes:
        head = {"version": 1, "equipment_type": self.equipment_type, "grid_us": self.grid_us,
                "scored_until": self.scored_until, "warmup_left": self.warmup_left, "reported": self.reported,
                "alert": None if self.alert is None else self.alert.to_dict(), "bucket": self.bucket, "day": self.day}
        h = json.dumps(head).encode()
        model = b"" if self.model is None else state_to_bytes(self.model)
        return STATE_MAGIC + len(h).to_bytes(8, "little") + h + model

    @classmethod
    def from_bytes(cls, blob: bytes) -> ScoreCarry:
        if not isinstance(blob, bytes | bytearray | memoryview) or bytes(blob[:8]) != STATE_MAGIC:
            raise ValueError("state: expected bytes written by ScoreCarry.to_bytes (a scoring state), got "
                             f"{type(blob).__name__}")
        blob = bytes(blob)
        n = int.from_bytes(blob[8:16], "little")
        head = json.loads(blob[16:16 + n])
        if head.get("version") != 1:
            raise ValueError(f"state: format version expected 1, got {head.get('version')!r}")
        rest = blob[16 + n:]
        return cls(head["equipment_type"], int(head["grid_us"]), int(head["scored_until"]), int(head["warmup_left"]),
                   int(head["reported"]), state_from_bytes(rest) if rest else None,
                   None if head["alert"] is None else PendingAlert.from_dict(head["alert"]), head["bucket"],
                   head["day"])


# --- outputs -----------------------------------------------------------------------------------------------


@dataclass
class ScoreOutput:
    """What the stage returns for one equipment and window (frames have UTC timestamps)."""

    equipment_type: str
    equipment: str
    threshold: float
    series: pl.DataFrame         # timestamp, score (NaN: not scored), flag, attr__<sensor>: one row per reported step
    alerts: pl.DataFrame         # ALERT_SCHEMA: one row per alert that ended or grew in this window
    downsampled: pl.DataFrame    # DOWNSAMPLED_SCHEMA: per display bucket (the first/last may extend earlier windows)
    expert_usage: pl.DataFrame   # USAGE_SCHEMA: per UTC day, layer and expert (days at the edges: whole-day totals)
    state: bytes | None          # pass to the next call (None: nothing consumed and no state was given)
    scored_until: datetime | None  # the last timestamp consumed (reported or warm-up)
    window_start: datetime | None  # the first new timestamp of this call (None: no new rows)
    report: dict[str, Any] = field(default_factory=dict)


def _schemas() -> tuple[dict, dict, dict]:
    import polars as pl

    utc = pl.Datetime("us", "UTC")
    alerts = {"equipment_type": pl.String, "equipment": pl.String, "start": utc, "end": utc, "steps": pl.Int64,
              "flagged_steps": pl.Int64, "peak_score": pl.Float64, "peak_at": utc, "threshold": pl.Float64,
              "severity": pl.String, "open": pl.Boolean,
              "top_sensors": pl.List(pl.Struct({"sensor": pl.String, "nll": pl.Float64, "share": pl.Float64})),
              "experts": pl.List(pl.Struct({"layer": pl.Int64, "expert": pl.Int64, "share": pl.Float64}))}
    down = {"timestamp": utc, "mean": pl.Float64, "max": pl.Float64, "n_scored": pl.Int64, "n_flagged": pl.Int64,
            "threshold": pl.Float64}
    usage = {"day": pl.Date, "layer": pl.Int64, "expert": pl.Int64, "count": pl.Int64, "steps": pl.Int64,
             "share": pl.Float64}
    return alerts, down, usage


# --- the streaming entry point -----------------------------------------------------------------------------


def stream_score(detector: RoMDetector, chunks: Iterable[np.ndarray | tuple[np.ndarray, np.ndarray]],
                 equipment_type: str, state: ForecasterState | None = None, chunk_len: int = 4096
                 ) -> Iterator[ScoreResult]:
    """Score an iterator of chunks, each values (L_i, n_sensors) with NaN where missing (or (values, mask)), with
    the state carried from chunk to chunk; yields one `ScoreResult` per chunk (its ``state`` continues the stream).
    Memory depends on the chunk sizes, not on the total length."""
    for chunk in chunks:
        values, mask = chunk if isinstance(chunk, tuple) else (chunk, None)
        r = detector.score(values, equipment_type, mask, state=state, chunk_len=chunk_len)
        state = r.state
        yield r


# --- alerts ------------------------------------------------------------------------------------------------


@dataclass
class ScoredSteps:
    """The reported steps of one window, as arrays (ts in µs since the epoch, UTC)."""

    ts: np.ndarray                 # (L,) int64
    score: np.ndarray              # (L,) float64, NaN where not scored
    flag: np.ndarray               # (L,) bool
    attr: np.ndarray               # (L, n)
    top: np.ndarray | None         # (n_layers, L, K) int16, None for a dense model


def _runs(flag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end indices (inclusive) of the runs of True in a 1-D bool array."""
    d = np.diff(np.concatenate([[0], flag.astype(np.int8), [0]]))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1


def _expert_counts(top: np.ndarray | None, a: int, b: int, shape: tuple[int, int]) -> np.ndarray:
    """(n_layers, E) counts of top-K slots over rows a..b-1."""
    out = np.zeros(shape, dtype=np.int64)
    if top is not None and b > a:
        for layer in range(shape[0]):
            out[layer] = np.bincount(top[layer, a:b].ravel().astype(np.int64), minlength=shape[1])[:shape[1]]
    return out


def extract_alerts(w: ScoredSteps, pending: PendingAlert | None, horizon: int, grid_us: int, cfg: ScoreConfig,
                   expert_shape: tuple[int, int]) -> tuple[list[tuple[PendingAlert, bool]], PendingAlert | None]:
    """Group the window's flagged runs (and the alert carried from the last window) into alerts.

    ``horizon``: µs of the last step consumed; a run ending within ``merge_gap_steps`` of it may still merge with
    the next window's runs. Returns ([(alert, open)] of alerts long enough to report, the alert to carry)."""
    starts, ends = _runs(w.flag)
    gap = cfg.merge_gap_steps
    groups: list[tuple[PendingAlert | None, int, int]] = []  # (carried part, first run, last run) as run indices
    first = 0
    out: list[tuple[PendingAlert, bool]] = []
    if pending is not None:
        if len(starts) and (w.ts[starts[0]] - pending.end) // grid_us - 1 <= gap:
            j = 0
            while j + 1 < len(starts) and (w.ts[starts[j + 1]] - w.ts[ends[j]]) // grid_us - 1 <= gap:
                j += 1
            groups.append((pending, 0, j))
            first = j + 1
        elif len(starts) == 0 and (horizon - pending.end) // grid_us <= gap:
            tail = _span_stats(w, 0, len(w.ts), expert_shape)
            pending.tail_steps += tail[0]
            pending.tail_attr = tail[1] if pending.tail_attr is None else pending.tail_attr + tail[1]
            pending.tail_experts = tail[2] if pending.tail_experts is None else pending.tail_experts + tail[2]
            return ([(pending, True)] if _long_enough(pending, grid_us, cfg) else []), pending
        else:  # closed before this window's first run (or by the time that passed)
            if _long_enough(pending, grid_us, cfg):
                out.append((pending, False))
    j = first
    while j < len(starts):
        k = j
        while k + 1 < len(starts) and (w.ts[starts[k + 1]] - w.ts[ends[k]]) // grid_us - 1 <= gap:
            k += 1
        groups.append((None, j, k))
        j = k + 1

    carry: PendingAlert | None = None
    for carried, j, k in groups:
        a, b = (0 if carried is not None else int(starts[j])), int(ends[k]) + 1
        steps, attr, experts = _span_stats(w, a, b, expert_shape)
        seg = w.score[a:b]
        i_peak = int(np.nanargmax(np.where(w.flag[a:b], seg, -np.inf)))
        alert = PendingAlert(int(w.ts[a]), int(w.ts[b - 1]), float(seg[i_peak]), int(w.ts[a + i_peak]),
                             int(w.flag[a:b].sum()), steps, attr, experts)
        if carried is not None:
            alert.start = carried.start
            alert.steps += carried.steps + carried.tail_steps
            alert.flagged += carried.flagged
            alert.attr = alert.attr + carried.attr + _or0(carried.tail_attr, carried.attr)
            alert.experts = alert.experts + carried.experts + _or0(carried.tail_experts, carried.experts)
            if carried.peak >= alert.peak:
                alert.peak, alert.peak_at = carried.peak, carried.peak_at
        is_open = (horizon - alert.end) // grid_us <= gap
        if is_open:
            tail = _span_stats(w, b, len(w.ts), expert_shape)
            alert.tail_steps, alert.tail_attr, alert.tail_experts = tail
            carry = alert
        if _long_enough(alert, grid_us, cfg):
            out.append((alert, is_open))
    return out, carry


def _or0(x: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    return np.zeros_like(like) if x is None else x


def _span_stats(w: ScoredSteps, a: int, b: int, expert_shape: tuple[int, int]) -> tuple[int, np.ndarray, np.ndarray]:
    return max(b - a, 0), w.attr[a:b].sum(0), _expert_counts(w.top, a, b, expert_shape)


def _long_enough(alert: PendingAlert, grid_us: int, cfg: ScoreConfig) -> bool:
    return (alert.end - alert.start) // grid_us + 1 >= cfg.min_alert_steps


def alert_row(alert: PendingAlert, is_open: bool, sensors: list[str], threshold: float, grid_us: int,
              cfg: ScoreConfig) -> dict[str, Any]:
    """One row of the alerts frame: severity, top sensors (share of the positive attribution) and, per layer, the
    experts most often among the top-K over the alert's steps (share of the steps)."""
    attr = alert.attr
    pos = np.clip(attr, 0, None)
    total = float(pos.sum())
    order = np.argsort(-attr, kind="stable")[:cfg.top_sensors]
    top_sensors = [{"sensor": sensors[i], "nll": float(attr[i]), "share": float(pos[i] / total) if total > 0 else 0.0}
                   for i in order]
    experts = []
    for layer, counts in enumerate(alert.experts):
        for e in np.argsort(-counts, kind="stable")[:cfg.top_experts]:
            if counts[e] > 0:
                experts.append({"layer": layer, "expert": int(e), "share": float(counts[e] / max(alert.steps, 1))})
    return {"start": _dt(alert.start), "end": _dt(alert.end), "steps": int((alert.end - alert.start) // grid_us + 1),
            "flagged_steps": alert.flagged,
            "peak_score": alert.peak, "peak_at": _dt(alert.peak_at), "threshold": threshold,
            "severity": severity(alert.peak, threshold, cfg.severity_nats), "open": is_open,
            "top_sensors": top_sensors, "experts": experts}


# --- display series and expert usage -----------------------------------------------------------------------


def _groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys -> (distinct keys, start index of each)."""
    idx = np.concatenate([[0], np.flatnonzero(np.diff(keys)) + 1]) if len(keys) else np.zeros(0, dtype=np.int64)
    return keys[idx], idx


def downsample(w: ScoredSteps, bucket_us: int, carried: dict[str, Any] | None) -> tuple[list[dict], dict | None]:
    """Per bucket of ``bucket_us``: sum, count, max and flagged count of the scores; the carried bucket (the last
    of the previous window) is merged when the window starts inside it. Returns (buckets, last bucket)."""
    if not len(w.ts):
        return [], carried
    b = w.ts // bucket_us
    keys, idx = _groups(b)
    ok = np.isfinite(w.score)
    sums = np.add.reduceat(np.where(ok, w.score, 0.0), idx)
    counts = np.add.reduceat(ok.astype(np.int64), idx)
    maxs = np.maximum.reduceat(np.where(ok, w.score, -np.inf), idx)
    flagged = np.add.reduceat(w.flag.astype(np.int64), idx)
    rows = [{"start": int(k) * bucket_us, "sum": float(s), "count": int(c), "max": float(m) if c else None,
             "flagged": int(f)} for k, s, c, m, f in zip(keys, sums, counts, maxs, flagged)]
    if carried is not None and carried["start"] == rows[0]["start"]:
        r = rows[0]
        r["sum"] += carried["sum"]
        r["count"] += carried["count"]
        r["flagged"] += carried["flagged"]
        r["max"] = max((m for m in (r["max"], carried["max"]) if m is not None), default=None)
    return rows, dict(rows[-1])


def expert_usage(w: ScoredSteps, expert_shape: tuple[int, int], carried: dict[str, Any] | None
                 ) -> tuple[list[dict], dict | None]:
    """Per UTC day: steps and (n_layers, E) counts of top-K slots; the carried day is merged when it continues."""
    if w.top is None or not len(w.ts):
        return [], carried
    days, idx = _groups(w.ts // DAY_US)
    n_layers, E = expert_shape
    g = np.repeat(np.arange(len(days)), np.diff(np.concatenate([idx, [len(w.ts)]])))
    counts = np.zeros((len(days), n_layers, E), dtype=np.int64)
    for layer in range(n_layers):
        key = (g[:, None] * E + w.top[layer].astype(np.int64)).ravel()
        counts[:, layer] = np.bincount(key, minlength=len(days) * E).reshape(len(days), E)
    steps = np.diff(np.concatenate([idx, [len(w.ts)]]))
    rows = [{"day": int(d), "steps": int(s), "counts": c.tolist()} for d, s, c in zip(days, steps, counts)]
    if carried is not None and carried["day"] == rows[0]["day"]:
        rows[0]["steps"] += carried["steps"]
        rows[0]["counts"] = (np.asarray(rows[0]["counts"]) + np.asarray(carried["counts"])).tolist()
    return rows, dict(rows[-1])


# --- the stage ---------------------------------------------------------------------------------------------


def _dt(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def _us(t: datetime) -> int:
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return (t - _EPOCH) // timedelta(microseconds=1)


def sensor_columns(columns: Iterable[str]) -> list[str]:
    """The sensor columns of a store frame (not the timestamp, flags or partition columns)."""
    return [c for c in columns if c not in _NOT_SENSORS and not c.endswith(MISSING_SUFFIX)]


def check_fit(detector: RoMDetector, equipment_type: str, equipment: str, columns: Iterable[str]) -> list[str]:
    """Raise `ScoringDataError` unless the model knows the type, has its threshold and expects exactly the frame's
    sensors; returns the model's sensor order."""
    if equipment_type not in detector.sensors:
        raise ScoringDataError(equipment_type, equipment, "equipment_type",
                               f"the model does not know equipment type {equipment_type!r} (it knows "
                               f"{', '.join(sorted(detector.sensors))}); retrain with this type")
    if equipment_type not in detector.threshold_:
        raise ScoringDataError(equipment_type, equipment, "threshold",
                               f"the model has no threshold for equipment type {equipment_type!r}")
    expected = detector.sensors[equipment_type]
    found = sensor_columns(columns)
    missing = [s for s in expected if s not in found]
    extra = [s for s in found if s not in expected]
    if missing or extra:
        parts = ([f"missing from the data: {missing}"] if missing else []) + (
            [f"not known to the model: {extra}"] if extra else [])
        raise ScoringDataError(equipment_type, equipment, "sensors",
                               f"sensor set differs from the model's {expected}: {'; '.join(parts)} "
                               f"(retrain, or fix plant.toml)")
    return expected


def infer_grid_us(ts: np.ndarray) -> int | None:
    """The most common positive step between sorted timestamps (µs); None for fewer than two."""
    d = np.diff(ts)
    d = d[d > 0]
    if not d.size:
        return None
    u, c = np.unique(d, return_counts=True)
    return int(u[c.argmax()])


def _segments(ts: np.ndarray, grid_us: int, max_gap: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sorted distinct timestamps -> [(row indices, grid positions from the segment's first row)]; gaps of up to
    ``max_gap`` missing grid steps stay inside a segment, longer ones start a new one."""
    steps = np.concatenate([[0], np.maximum(np.diff(ts) // grid_us, 1)])
    breaks = np.flatnonzero(steps > max_gap + 1)
    steps[breaks] = 0
    out = []
    for idx in np.split(np.arange(len(ts)), breaks):
        pos = np.cumsum(steps[idx])
        out.append((idx, pos - pos[0]))
    return out


def score_equipment(detector: RoMDetector, frame: pl.DataFrame, equipment_type: str, equipment: str,
                    cfg: ScoreConfig | None = None, *, state: bytes | None = None,
                    scored_until: datetime | None = None, report_from: datetime | None = None,
                    grid: timedelta | None = None, final: bool = True) -> ScoreOutput:
    """Score the rows of ``frame`` after the saved state's last timestamp.

    frame: one equipment's store rows (``timestamp``, the type's sensors, ``<sensor>__missing``), any order; rows
    at or before ``scored_until`` are skipped. state: ``ScoreOutput.state`` of the previous call (None: start
    fresh, the first ``cfg.warmup_steps`` steps only warm up); ``scored_until``, when given, must be the state's.
    report_from: steps before it are scored (they advance the state) but not reported. grid: the store's grid
    (default: the state's, else inferred from the frame). final: this window ends the data there is (False while
    more windows follow: an all-missing window is then stepped through, and a short one only warms up).

    Raises `ScoringDataError` (naming the equipment and the problem) on a sensor-set mismatch or an unknown type;
    in a final window also when its new rows have no observed value at all, or when the model has never got past
    its warm-up (too little history).
    """
    import polars as pl

    cfg = cfg or ScoreConfig()
    sensors = check_fit(detector, equipment_type, equipment, frame.columns)
    threshold = float(detector.threshold_[equipment_type])
    mcfg = detector.model.cfg
    expert_shape = (mcfg.n_layers, mcfg.num_experts) if not mcfg.dense else (0, 0)
    carry = None if state is None else ScoreCarry.from_bytes(state)
    if carry is not None:
        if carry.equipment_type != equipment_type:
            raise ScoringDataError(equipment_type, equipment, "state",
                                   f"the saved state belongs to equipment type {carry.equipment_type!r}")
        if scored_until is not None and _us(scored_until) != carry.scored_until:
            raise ScoringDataError(equipment_type, equipment, "state",
                                   f"scored_until {scored_until.isoformat()} differs from the saved state's "
                                   f"{_dt(carry.scored_until).isoformat()}")
    if "equipment" in frame.columns:
        others = [e for e in frame["equipment"].unique().to_list() if e != equipment]
        if others:
            raise ValueError(f"frame: rows of other equipment {others[:3]} in the frame of {equipment!r}")

    ts_all = frame[TS].dt.epoch("us").to_numpy() if frame.height else np.zeros(0, dtype=np.int64)
    order = np.argsort(ts_all, kind="stable")
    if carry is not None:
        order = order[ts_all[order] > carry.scored_until]
    ts = ts_all[order]
    if len(ts) > 1 and (np.diff(ts) == 0).any():
        keep = np.concatenate([np.diff(ts) != 0, [True]])  # duplicate timestamps: the last row wins
        order, ts = order[keep], ts[keep]
    report: dict[str, Any] = {"rows_in": frame.height, "rows_new": len(ts), "steps_scored": 0, "steps_reported": 0,
                              "warmup_steps": 0, "gap_rows": 0, "restarts": 0, "flagged_steps": 0, "alerts": 0,
                              "alerts_open": 0}
    alerts_schema, down_schema, usage_schema = _schemas()
    attr_schema = {TS: pl.Datetime("us", "UTC"), "score": pl.Float64, "flag": pl.Boolean,
                   **{ATTRIBUTION_PREFIX + s: pl.Float64 for s in sensors}}
    if not len(ts):
        return ScoreOutput(equipment_type, equipment, threshold, pl.DataFrame(schema=attr_schema),
                           pl.DataFrame(schema=alerts_schema), pl.DataFrame(schema=down_schema),
                           pl.DataFrame(schema=usage_schema), state,
                           None if carry is None else _dt(carry.scored_until), None, report)

    from pipelines.detector import frame_arrays

    in_order = len(order) == frame.height and bool((order == np.arange(frame.height)).all())
    values, mask = frame_arrays(frame if in_order else frame[order], sensors)
    if final and not mask.any():
        raise ScoringDataError(equipment_type, equipment, "all_missing",
                               f"all {len(ts)} new rows ({_dt(ts[0]).isoformat()} .. {_dt(ts[-1]).isoformat()}) "
                               f"have no observed value of any sensor {sensors}")
    grid_us = (int(grid / timedelta(microseconds=1)) if grid is not None
               else carry.grid_us if carry is not None else infer_grid_us(ts))
    if grid_us is None:
        raise ScoringDataError(equipment_type, equipment, "history",
                               f"too little history: {len(ts)} row(s), cannot tell the time grid; need more than "
                               f"warmup_steps={cfg.warmup_steps} steps")
    if carry is None:
        carry = ScoreCarry(equipment_type, grid_us, int(ts[0]) - grid_us, warmup_left=cfg.warmup_steps)
    else:
        carry.grid_us = grid_us
    report_from_us = None if report_from is None else _us(report_from)

    segs = _segments(ts, grid_us, cfg.max_gap_steps)
    parts: list[ScoredSteps] = []
    model_state = carry.model
    window_start = int(ts[0])
    n = len(sensors)
    for k, (idx, pos) in enumerate(segs):
        lead = 0  # unobserved rows before the segment, continuing the carried state across a short gap
        if k > 0:  # after a gap longer than max_gap_steps
            model_state = None
        elif model_state is not None:
            lead = int((ts[idx[0]] - carry.scored_until) // grid_us) - 1
            if lead > cfg.max_gap_steps:
                model_state, lead = None, 0
        if model_state is None:
            carry.warmup_left = cfg.warmup_steps
            report["restarts"] += 1
        T = lead + int(pos[-1]) + 1
        v = np.full((T, n), np.nan)
        m = np.zeros((T, n), dtype=bool)
        v[lead + pos], m[lead + pos] = values[idx], mask[idx]
        t = int(ts[idx[0]]) - lead * grid_us + np.arange(T, dtype=np.int64) * grid_us
        report["gap_rows"] += T - len(idx)
        r = detector.score(v, equipment_type, m, state=model_state, chunk_len=cfg.chunk_len)
        model_state = r.state
        report["steps_scored"] += T
        skip = min(carry.warmup_left, T)
        carry.warmup_left -= skip
        report["warmup_steps"] += skip
        keep = np.arange(T) >= skip
        if report_from_us is not None:
            keep &= t >= report_from_us
        if keep.any():
            score = r.score[keep]
            parts.append(ScoredSteps(t[keep], score, detector.flags(score, equipment_type), r.attribution[keep],
                                 None if r.top_experts is None else r.top_experts[:, keep]))
    carry.model = model_state
    carry.scored_until = int(ts[-1])

    if parts:
        w = ScoredSteps(np.concatenate([p.ts for p in parts]), np.concatenate([p.score for p in parts]),
                    np.concatenate([p.flag for p in parts]), np.concatenate([p.attr for p in parts]),
                    None if parts[0].top is None else np.concatenate([p.top for p in parts], axis=1))
    else:
        w = ScoredSteps(np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=bool), np.zeros((0, n)),
                    None if mcfg.dense else np.zeros((mcfg.n_layers, 0, mcfg.top_k), dtype=np.int16))
    if mcfg.dense:
        w.top = None
    report["steps_reported"] = len(w.ts)
    report["flagged_steps"] = int(w.flag.sum())
    carry.reported += len(w.ts)
    if final and carry.reported == 0 and carry.warmup_left > 0:
        raise ScoringDataError(equipment_type, equipment, "history",
                               f"too little history: {cfg.warmup_steps - carry.warmup_left} steps up to "
                               f"{_dt(carry.scored_until).isoformat()}, the model needs "
                               f"warmup_steps={cfg.warmup_steps} to warm up before it reports scores")

    found, carry.alert = extract_alerts(w, carry.alert, carry.scored_until, grid_us, cfg, expert_shape)
    rows = []
    for alert, is_open in found:
        rows.append(dict(alert_row(alert, is_open, sensors, threshold, grid_us, cfg), equipment_type=equipment_type,
                         equipment=equipment))
    report["alerts"] = len(rows)
    report["alerts_open"] = sum(r["open"] for r in rows)
    buckets, carry.bucket = downsample(w, cfg.bucket_us, carry.bucket)
    days, carry.day = expert_usage(w, expert_shape, carry.day)

    series = pl.DataFrame({TS: w.ts, "score": w.score, "flag": w.flag,
                           **{ATTRIBUTION_PREFIX + s: w.attr[:, j] for j, s in enumerate(sensors)}}
                          ).with_columns(pl.col(TS).cast(pl.Datetime("us")).dt.replace_time_zone("UTC"))
    down = pl.DataFrame([{"timestamp": _dt(b["start"]), "mean": b["sum"] / b["count"], "max": b["max"],
                          "n_scored": b["count"], "n_flagged": b["flagged"], "threshold": threshold}
                         for b in buckets if b["count"] > 0], schema=down_schema)
    usage = pl.DataFrame([{"day": (_EPOCH + timedelta(days=d["day"])).date(), "layer": layer, "expert": e,
                           "count": c, "steps": d["steps"], "share": c / (d["steps"] * mcfg.top_k)}
                          for d in days for layer, counts in enumerate(d["counts"]) for e, c in enumerate(counts)],
                         schema=usage_schema)
    alerts = pl.DataFrame([{k: r[k] for k in alerts_schema} for r in rows], schema=alerts_schema)
    return ScoreOutput(equipment_type, equipment, threshold, series.select(list(attr_schema)), alerts, down, usage,
                       carry.to_bytes(), _dt(carry.scored_until), _dt(window_start), report)


__all__ = ["SEVERITIES", "PendingAlert", "ScoreCarry", "ScoredSteps", "ScoreConfig", "ScoreOutput", "ScoringDataError",
           "check_fit", "downsample", "expert_usage", "extract_alerts", "infer_grid_us", "score_equipment",
           "sensor_columns", "severity", "stream_score"]
