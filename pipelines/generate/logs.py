"""Realistic plant logs from a unit's truth: wide logger CSVs and historian long exports, with defects.

Log defects are data-quality problems the ingest has to handle (they are not process anomalies and are
not labelled): sentinels, empty cells, logger outages, duplicated rows; in historian exports also
deadband compression (irregular timestamps), state words in the value column, Bad / Uncertain quality,
exact and conflicting duplicates. They stay clear of labelled windows so every label remains visible
after ingest. Every defect is reported (equipment, sensor, UTC minute, kind) for ingest tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipelines.generate.equipment import EquipmentType
from pipelines.generate.plant import UnitTruth
from pipelines.generate.signals import MINUTES_PER_DAY, Calendar

SENTINEL = -9999.0
STATE_WORDS = ("I/O Timeout", "Comm Fail")
HEARTBEAT_MINUTES = 10  # a historian stores a value at least this often, even when it does not change
DEFECT_SCHEMA = {"equipment": pl.String, "sensor": pl.String, "timestamp": pl.Datetime("us", "UTC"), "kind": pl.String}


@dataclass(frozen=True)
class LogSource:
    """How one equipment type is logged; becomes a [[sources]] table of plant.toml."""

    name: str
    equipment_type: str
    layout: str  # wide | long
    folder: str  # relative to the plant folder
    timestamp_column: str
    timestamp_format: str  # polars / chrono format
    timezone: str  # zone the timestamps are written in
    max_ffill: int  # grid steps the ingest may forward-fill (historian: covers the heartbeat)

    @property
    def glob(self) -> str:
        return f"{self.folder}/*.csv"


def log_sources(local_timezone: str) -> tuple[LogSource, ...]:
    return (
        LogSource("pumps-wide", "pump", "wide", "raw/pumps", "timestamp", "%Y-%m-%d %H:%M:%S", local_timezone, 5),
        LogSource(
            "compressors-historian", "compressor", "long", "raw/historian/compressors", "timestamp",
            "%Y-%m-%d %H:%M:%S%.3f", "UTC", HEARTBEAT_MINUTES + 5,
        ),
        LogSource("conveyors-wide", "conveyor", "wide", "raw/conveyors", "time", "%d.%m.%Y %H:%M", local_timezone, 5),
    )


def protected_mask(unit: UnitTruth, pad: int = 10) -> np.ndarray:
    """(n,) bool: labelled windows widened by `pad` minutes, where no log defect may fall."""
    mask = np.zeros(unit.data.height, dtype=bool)
    for a in unit.anomalies:
        mask[max(0, a.start - pad) : a.end + 1 + pad] = True
    return mask


def _pick(rng: np.random.Generator, allowed: np.ndarray, k: int) -> np.ndarray:
    """k distinct sorted indices drawn from the True positions of `allowed`."""
    pool = np.flatnonzero(allowed)
    return np.sort(rng.choice(pool, size=min(k, len(pool)), replace=False))


def _defects(eid: str, sensors: list[str], minutes: np.ndarray, kind: str, cal: Calendar) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "equipment": [eid] * len(minutes),
            "sensor": sensors,
            "timestamp": cal.timestamps.gather(minutes),
            "kind": [kind] * len(minutes),
        },
        schema=DEFECT_SCHEMA,
    )


def format_timestamps(cal: Calendar, source: LogSource) -> pl.Series:
    """The grid's timestamps as the logger writes them (local wall-clock time in the source's zone)."""
    return cal.timestamps.dt.convert_time_zone(source.timezone).dt.strftime(source.timestamp_format)


def write_wide(
    path: Path, unit: UnitTruth, etype: EquipmentType, source: LogSource, stamps: pl.Series,
    cal: Calendar, rng: np.random.Generator,
) -> tuple[int, pl.DataFrame]:
    """One unit's wide CSV: timestamp, equipment_id, one column per sensor. Returns (rows, defects)."""
    n = unit.data.height
    names = etype.sensor_names
    values = {s: unit.data[s].to_numpy().copy() for s in names}
    free = ~protected_mask(unit)
    days = n / MINUTES_PER_DAY
    defects = []

    n_sentinel, n_missing = max(2, n * len(names) // 20000), max(2, n * len(names) // 10000)
    cells = rng.permutation(_pick(rng, np.repeat(free, len(names)), n_sentinel + n_missing))  # row * sensors + col
    for kind, chosen, fill in (("sentinel", cells[:n_sentinel], SENTINEL), ("missing", cells[n_sentinel:], np.nan)):
        rows, cols = np.divmod(np.sort(chosen), len(names))
        for c in np.unique(cols):
            values[names[c]][rows[cols == c]] = fill
        defects.append(_defects(unit.equipment_id, [names[c] for c in cols], rows, kind, cal))

    keep = np.ones(n, dtype=bool)  # logger outages: rows absent
    for start in _pick(rng, free, max(1, round(days / 10))):
        length = int(rng.integers(5, 31))
        if free[start : start + length].all():
            keep[start : start + length] = False
            gone = np.arange(start, min(n, start + length))
            defects.append(_defects(unit.equipment_id, ["*"] * len(gone), gone, "gap", cal))
    index = np.flatnonzero(keep)
    dups = _pick(rng, keep & free, max(1, round(days / 15)))  # logger restart re-sends a row
    index = np.sort(np.concatenate([index, dups]), kind="stable")
    defects.append(_defects(unit.equipment_id, ["*"] * len(dups), dups, "duplicate", cal))

    frame = pl.DataFrame({source.timestamp_column: stamps, "equipment_id": [unit.equipment_id] * n, **values})
    frame = frame.fill_nan(None).select(pl.all().gather(index))
    frame.write_csv(path)
    return frame.height, pl.concat(defects)


def _compress(x: np.ndarray, deadband: float, phase: int) -> np.ndarray:
    """Indices a deadband historian keeps: a change of quantisation bucket, or the heartbeat."""
    q = np.floor(x / deadband)
    keep = np.empty(len(x), dtype=bool)
    keep[0] = True
    keep[1:] = q[1:] != q[:-1]
    keep |= np.arange(len(x)) % HEARTBEAT_MINUTES == phase
    return np.flatnonzero(keep)


def write_long(
    path: Path, unit: UnitTruth, etype: EquipmentType, source: LogSource, cal: Calendar, rng: np.random.Generator
) -> tuple[int, pl.DataFrame]:
    """One unit's historian export: tag, timestamp (irregular, ms), value (text), quality. Returns
    (rows, defects)."""
    n = unit.data.height
    eid = unit.equipment_id
    names = etype.sensor_names
    free = ~protected_mask(unit)
    days = n / MINUTES_PER_DAY
    defects = []

    # interface shutdowns: every tag gets a "Shutdown" marker, then nothing for a few minutes
    down = np.zeros(n, dtype=bool)
    shutdowns = []
    for start in _pick(rng, free, max(1, round(days / 10))):
        length = int(rng.integers(5, 21))
        if free[start : start + length].all():
            down[start : start + length] = True
            shutdowns.append(start)
            gone = np.arange(start, min(n, start + length))
            defects.append(_defects(eid, ["*"] * len(gone), gone, "shutdown", cal))

    tag_idx, minute, value = [], [], []
    for j, s in enumerate(etype.sensors):
        x = unit.data[s.name].to_numpy()
        kept = _compress(x, 4.0 * s.noise, int(rng.integers(HEARTBEAT_MINUTES)))
        kept = kept[~down[kept]]
        tag_idx.append(np.full(len(kept), j))
        minute.append(kept)
        value.append(x[kept])
    for start in shutdowns:
        tag_idx.append(np.arange(len(names)))
        minute.append(np.full(len(names), start))
        value.append(np.full(len(names), np.nan))
    tag_idx, minute, value = np.concatenate(tag_idx), np.concatenate(minute), np.concatenate(value)
    rows = len(minute)
    text = pl.Series(value, nan_to_null=True).cast(pl.String).fill_null("Shutdown").to_numpy().astype(object)
    quality = np.where(np.isnan(value), "Bad", "Good").astype(object)

    normal = ~np.isnan(value) & free[minute]
    used = np.zeros(rows, dtype=bool)

    def take(k: int) -> np.ndarray:
        idx = _pick(rng, normal & ~used, k)
        used[idx] = True
        return idx

    for kind, k in (("state_word", max(3, rows // 20000)), ("bad_quality", max(2, rows // 50000)),
                    ("uncertain", max(5, rows // 2000)), ("sentinel", max(2, rows // 50000))):
        idx = take(k)
        if kind == "state_word":
            text[idx] = rng.choice(STATE_WORDS, size=len(idx))
        if kind in ("state_word", "bad_quality"):
            quality[idx] = "Bad"
        elif kind == "uncertain":
            quality[idx] = "Uncertain"
        else:
            text[idx] = f"{SENTINEL:.0f}"
        defects.append(_defects(eid, [names[t] for t in tag_idx[idx]], minute[idx], kind, cal))

    # each reading is stamped when the collector took it, up to 30 s before the minute it stands for, so
    # the value "as of" grid time T (the last reading in (T - 1 min, T]) is the truth at T
    stamp_ms = cal.timestamps.dt.epoch("ms").to_numpy()[minute] - rng.integers(0, 30000, size=rows)
    exact = take(max(3, rows // 100000))
    conflict = take(2)
    defects.append(_defects(eid, [names[t] for t in tag_idx[exact]], minute[exact], "duplicate", cal))
    defects.append(_defects(eid, [names[t] for t in tag_idx[conflict]], minute[conflict], "conflicting_duplicate", cal))
    other = np.array([str(round(value[i] * 1.08 + 3 * etype.sensors[tag_idx[i]].noise, 3)) for i in conflict])
    source_row = np.concatenate([np.arange(rows), exact, conflict])
    text = np.concatenate([text, text[exact], other.astype(object)])
    quality = np.concatenate([quality, quality[exact], np.full(len(conflict), "Good", dtype=object)])

    tags = np.array([f"{eid}.{s}" for s in names], dtype=object)
    frame = pl.DataFrame(
        {
            "tag": tags[tag_idx[source_row]],
            "ms": stamp_ms[source_row],
            "value": text,
            "quality": quality,
            "_tag": tag_idx[source_row],
        },
        schema={"tag": pl.String, "ms": pl.Int64, "value": pl.String, "quality": pl.String, "_tag": pl.Int64},
    )
    frame = frame.sort(["ms", "_tag"], maintain_order=True).select(
        "tag",
        pl.col("ms").cast(pl.Datetime("ms", "UTC")).dt.convert_time_zone(source.timezone)
        .dt.strftime(source.timestamp_format).alias(source.timestamp_column),
        "value",
        "quality",
    )
    frame.write_csv(path)
    return frame.height, pl.concat(defects)
