"""Loader for SKAB (Skoltech Anomaly Benchmark) folders: a pump testbed, 8 sensors at about 1 Hz.

A SKAB file is ';'-separated with a header: datetime ('YYYY-MM-DD hh:mm:ss', no zone), the 8 sensors,
and in labelled experiments the 0/1 columns 'anomaly' and 'changepoint'. The data are GPL-licensed: read
them where the user keeps them, never copy them into this repository.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

SKAB_SENSORS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)
SKAB_LABELS = ("anomaly", "changepoint")
SKAB_TIMESTAMP = "datetime"
SKAB_FORMAT = "%Y-%m-%d %H:%M:%S"
SEPARATOR = ";"


@dataclass(frozen=True)
class SkabSeries:
    """One SKAB experiment.

    name: path relative to the loaded root without suffix ("valve1/3", "anomaly-free/anomaly-free").
    frame: 'timestamp' (Datetime[us, UTC], strictly increasing) + the 8 sensors (Float64), rows in file order.
    labels / changepoints: (rows,) int8 0/1 arrays, or None for anomaly-free files (no label columns).
    """

    name: str
    path: Path
    frame: pl.DataFrame
    labels: np.ndarray | None
    changepoints: np.ndarray | None

    @property
    def sensors(self) -> list[str]:
        return list(SKAB_SENSORS)


def _natural_key(path: Path) -> list[object]:
    """Sort 'valve1/10.csv' after 'valve1/9.csv'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def load_skab(path: str | Path, *, timezone: str = "UTC") -> list[SkabSeries]:
    """Every SKAB csv under `path` (a SKAB data folder, a subfolder such as valve1/, or one file).

    Series are ordered by folder, then file number. SKAB does not state the zone of its timestamps: they
    are read as wall-clock time in `timezone` (default UTC) and returned in UTC.
    Raises FileNotFoundError for a missing path or a folder without csv files, ValueError for a malformed
    file (naming the file, line and column).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"SKAB path not found: {root}")
    if root.is_file():
        return [read_skab_file(root, name=root.stem, timezone=timezone)]
    files = sorted(root.rglob("*.csv"), key=lambda p: _natural_key(p.relative_to(root)))
    if not files:
        raise FileNotFoundError(f"no SKAB csv files under {root} (expected e.g. anomaly-free/*.csv, valve1/*.csv)")
    return [read_skab_file(f, name=f.relative_to(root).with_suffix("").as_posix(), timezone=timezone) for f in files]


def _ragged_line(path: Path, expected: int) -> str:
    """Locate the first line whose field count differs from the header's (polars' message has no line)."""
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            fields = line.rstrip("\r\n").count(SEPARATOR) + 1
            if line.strip() and fields != expected:
                return f"line {lineno}: expected {expected} ';'-separated fields, found {fields}"
    return "unreadable content"


def _first_bad(raw: pl.Series, parsed: pl.Series) -> int | None:
    """Row of the first value that is missing or failed to parse, or None."""
    bad = (parsed.is_null() | raw.is_null()).arg_true()
    return int(bad[0]) if len(bad) else None


def read_skab_file(path: str | Path, *, name: str | None = None, timezone: str = "UTC") -> SkabSeries:
    """Read and validate one SKAB csv. Line numbers in errors count the header as line 1."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SKAB file not found: {path}")
    try:
        header = path.open(encoding="utf-8").readline().rstrip("\r\n").split(SEPARATOR)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    if header == [""]:
        raise ValueError(f"{path}: empty file (expected a ';'-separated header starting with '{SKAB_TIMESTAMP}')")
    if header[0] != SKAB_TIMESTAMP:
        raise ValueError(f"{path}: line 1, column 1: expected '{SKAB_TIMESTAMP}', found {header[0]!r}")
    missing = [c for c in SKAB_SENSORS if c not in header]
    if missing:
        raise ValueError(f"{path}: line 1: missing column(s) {missing}; found {header}")
    unknown = [c for c in header if c not in (SKAB_TIMESTAMP, *SKAB_SENSORS, *SKAB_LABELS)]
    if unknown or len(set(header)) != len(header):
        raise ValueError(f"{path}: line 1: unexpected or repeated column(s) {unknown or header}")
    if "changepoint" in header and "anomaly" not in header:
        raise ValueError(f"{path}: line 1: 'changepoint' without 'anomaly' column")

    try:
        raw = pl.read_csv(path, separator=SEPARATOR, infer_schema=False, encoding="utf8")
    except (pl.exceptions.ComputeError, pl.exceptions.ShapeError, pl.exceptions.NoDataError) as exc:
        raise ValueError(f"{path}: {_ragged_line(path, len(header))}") from exc
    if raw.height == 0:
        raise ValueError(f"{path}: no data rows after the header")

    ts = raw[SKAB_TIMESTAMP].str.to_datetime(SKAB_FORMAT, strict=False)
    row = _first_bad(raw[SKAB_TIMESTAMP], ts)
    if row is not None:
        raise ValueError(
            f"{path}: line {row + 2}, column '{SKAB_TIMESTAMP}': expected 'YYYY-MM-DD hh:mm:ss', "
            f"found {raw[SKAB_TIMESTAMP][row]!r}"
        )
    ts = ts.dt.replace_time_zone(timezone, non_existent="raise", ambiguous="raise").dt.convert_time_zone("UTC")
    steps = ts.diff().dt.total_microseconds()
    not_after = (steps <= 0).arg_true()
    if len(not_after):
        i = int(not_after[0])
        raise ValueError(
            f"{path}: line {i + 2}, column '{SKAB_TIMESTAMP}': {raw[SKAB_TIMESTAMP][i]!r} is not after the "
            f"previous row's {raw[SKAB_TIMESTAMP][i - 1]!r} (duplicate or out of order)"
        )

    columns: dict[str, pl.Series] = {"timestamp": ts.alias("timestamp")}
    for col in (c for c in header if c != SKAB_TIMESTAMP):
        values = raw[col].str.strip_chars().cast(pl.Float64, strict=False)
        bad = _first_bad(raw[col], values)
        if bad is None and col not in SKAB_LABELS:
            finite = values.is_finite()
            bad = None if finite.all() else int((~finite).arg_true()[0])
        if bad is None and col in SKAB_LABELS:
            not01 = (~values.is_in([0.0, 1.0])).arg_true()
            bad = int(not01[0]) if len(not01) else None
        if bad is not None:
            expected = "0 or 1" if col in SKAB_LABELS else "a finite number"
            found = raw[col][bad]
            found = repr(found) if found is not None else "an empty field (or a short line)"
            raise ValueError(f"{path}: line {bad + 2}, column '{col}': expected {expected}, found {found}")
        columns[col] = values

    frame = pl.DataFrame([columns["timestamp"], *(columns[c] for c in SKAB_SENSORS)])
    labels = columns["anomaly"].cast(pl.Int8).to_numpy() if "anomaly" in columns else None
    changepoints = columns["changepoint"].cast(pl.Int8).to_numpy() if "changepoint" in columns else None
    return SkabSeries(name or path.stem, path, frame, labels, changepoints)
