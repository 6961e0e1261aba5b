"""The ingested store: a hive-partitioned parquet dataset, one file per equipment and UTC calendar month.

Layout: ``<store>/equipment_type=<type>/equipment=<id>/month=<YYYY-MM>/part-0.parquet`` (values
percent-encoded as polars does). The issue asked for a dataset partitioned by equipment type / equipment /
date: type and equipment are folders, and the date is a month folder (a range of UTC days) with the exact
time in the ``timestamp`` column of every row; `read_range` reads whole days. Months, not days: a file costs
the ingest about 1.4 ms of CPU whatever its size (create, folder, rename, footer), so one file per day was
~15 CPU s per GB of logs; a month of one equipment at 1 min is ~44k rows, small enough to rewrite.

Each file holds ``timestamp`` (Datetime[us, UTC], on the source's grid, sorted), one Float64 column per
sensor (bounded forward fill applied) and ``<sensor>__missing`` (Boolean: no observation at that grid point,
so the value is filled or null). The ingest replaces a month's file whole and atomically (the month's stored
rows merged with the new ones, written under a temporary name, then renamed over the old file).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from urllib.parse import quote, unquote

import polars as pl

from pipelines.config import EquipmentType

DATA_FILE = "part-0.parquet"
TS = "timestamp"
UTC_US = pl.Datetime("us", "UTC")
COMPRESSION = "lz4"  # fast to write and read; the store is rewritten a month at a time


def store_schema(etype: EquipmentType) -> dict[str, pl.DataType]:
    """Column order and dtypes of every store file of an equipment type."""
    schema: dict[str, pl.DataType] = {TS: UTC_US}
    schema.update({s.name: pl.Float64 for s in etype.sensors})
    schema.update({f"{s.name}__missing": pl.Boolean for s in etype.sensors})
    return schema


def month_of(day: date | datetime) -> date:
    """The first day of the (UTC) month of ``day``: the key of its store file."""
    return date(day.year, day.month, 1)


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def months_between(start: date, end: date) -> list[date]:
    """The months from ``start``'s to ``end``'s, inclusive (first days)."""
    out, m = [], month_of(start)
    while m <= end:
        out.append(m)
        m = next_month(m)
    return out


def equipment_dir(store: Path, etype: str, equipment: str) -> Path:
    return store / f"equipment_type={quote(etype, safe='')}" / f"equipment={quote(equipment, safe='')}"


def partition_file(store: Path, etype: str, equipment: str, day: date) -> Path:
    """The file holding ``day`` (that is, its month's file)."""
    return equipment_dir(store, etype, equipment) / f"month={day:%Y-%m}" / DATA_FILE


def list_partitions(store: str | Path, equipment_type: str | None = None) -> list[tuple[str, str, date, Path]]:
    """(equipment type, equipment, month, file) of every store file, sorted; read from the folder names."""
    et = f"equipment_type={quote(equipment_type, safe='')}" if equipment_type else "equipment_type=*"
    out = []
    for f in Path(store).glob(f"{et}/equipment=*/month=*/{DATA_FILE}"):
        month_dir, eq_dir, type_dir = f.parent, f.parent.parent, f.parent.parent.parent
        try:
            month = datetime.strptime(month_dir.name.split("=", 1)[1], "%Y-%m").date()
        except ValueError:
            continue  # not a partition of ours
        out.append((unquote(type_dir.name.split("=", 1)[1]), unquote(eq_dir.name.split("=", 1)[1]), month, f))
    return sorted(out)


def store_index(store: str | Path, equipment_type: str | None = None) -> list[tuple[str, str, date, date]]:
    """(equipment type, equipment, first day, last day) of every equipment in the store, sorted. Only the first
    and the last month file of each equipment are opened (for their first and last timestamp)."""
    files: dict[tuple[str, str], list[Path]] = {}
    for t, e, _, f in list_partitions(store, equipment_type):
        files.setdefault((t, e), []).append(f)
    out = []
    for (t, e), fs in files.items():
        first = pl.scan_parquet(fs[0]).select(pl.col(TS).min()).collect().item()
        last = pl.scan_parquet(fs[-1]).select(pl.col(TS).max()).collect().item()
        if first is not None and last is not None:
            out.append((t, e, first.date(), last.date()))
    return out


Pending = dict[tuple[str, date], Path]  # (equipment, month) -> a file written in this run, not yet in the store


def read_months(store: Path, etype: EquipmentType, equipment: str, months: Iterable[date],
                pending: Pending | None = None, since: datetime | None = None) -> pl.DataFrame:
    """The stored rows of the given months (first days), from ``since`` on when given, sorted by time (empty
    frame with the store schema when none exist); files in ``pending`` (written earlier in the same run) take
    the place of the store's."""
    pending = pending or {}
    files = [p for m in sorted(set(months))
             if (p := pending.get((equipment, m)) or partition_file(store, etype.name, equipment, m)).exists()]
    schema = store_schema(etype)
    if not files:
        return pl.DataFrame(schema=schema)
    frames = []
    for f in files:
        lf = pl.scan_parquet(f)
        if since is not None:
            lf = lf.filter(pl.col(TS) >= since)
        frames.append(_conform(lf.collect(), schema))
    return pl.concat(frames, how="vertical").sort(TS)


def read_range(store: Path, etype: EquipmentType, equipment: str, start: date, end: date,
               pending: Pending | None = None) -> pl.DataFrame:
    """The stored rows of the UTC days ``start`` to ``end`` (inclusive), sorted by time."""
    t0 = datetime.combine(start, time(), tzinfo=UTC)
    t1 = datetime.combine(end + timedelta(days=1), time(), tzinfo=UTC)
    df = read_months(store, etype, equipment, months_between(start, end), pending, since=t0)
    return df.filter(pl.col(TS) < t1)


def _conform(df: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Add sensors that a file predates (null value, missing) and order columns as the schema says."""
    if list(df.schema.items()) == list(schema.items()):
        return df
    cols = []
    for name, dtype in schema.items():
        if name in df.columns:
            cols.append(pl.col(name).cast(dtype))
        else:
            cols.append(pl.lit(True if dtype == pl.Boolean else None, dtype).alias(name))
    return df.select(cols)


def write_months(rows: pl.DataFrame, path_of: Callable[[date], Path]) -> dict[date, tuple[Path, int]]:
    """Write store rows (store schema) as one file per UTC month at ``path_of(month)`` (folders made as needed);
    returns month -> (file, rows). Used by the ingest (into its staging folder) and tests."""
    if not rows[TS].is_sorted():
        rows = rows.sort(TS)
    ts = rows[TS]
    out: dict[date, tuple[Path, int]] = {}
    if not ts.len():
        return out
    months = months_between(ts[0].date(), ts[-1].date())
    edges = [datetime.combine(m, time(), tzinfo=UTC) for m in [*months, next_month(months[-1])]]
    cuts = [ts.search_sorted(e) for e in edges]  # sorted by time: each month is a slice (no copy)
    for month, lo, hi in zip(months, cuts, cuts[1:]):
        if hi > lo:
            path = path_of(month)
            path.parent.mkdir(parents=True, exist_ok=True)
            rows.slice(lo, hi - lo).write_parquet(path, compression=COMPRESSION, statistics=True)
            out[month] = (path, hi - lo)
    return out


def scan_store(store: str | Path, equipment_type: str | None = None, equipment: str | None = None) -> pl.LazyFrame:
    """Lazily read the store (partition columns equipment_type, equipment and month, "YYYY-MM", come back as
    columns)."""
    store = Path(store)
    et = f"equipment_type={quote(equipment_type, safe='')}" if equipment_type else "equipment_type=*"
    eq = f"equipment={quote(equipment, safe='')}" if equipment else "equipment=*"
    pattern = store / et / eq / "month=*" / "*.parquet"
    if not list(store.glob(str(pattern.relative_to(store)))):
        raise FileNotFoundError(f"no ingested data under {store} matching {et}/{eq}")
    return pl.scan_parquet(str(pattern), hive_partitioning=True, hive_schema={
        "equipment_type": pl.String, "equipment": pl.String, "month": pl.String}, missing_columns="insert")
