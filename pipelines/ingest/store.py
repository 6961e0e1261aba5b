"""The ingested store: a hive-partitioned parquet dataset, one file per equipment and UTC day.

Layout: ``<store>/equipment_type=<type>/equipment=<id>/date=<YYYY-MM-DD>/part-0.parquet`` (values
percent-encoded as polars does). Each file holds ``timestamp`` (Datetime[us, UTC], on the source's grid),
one Float64 column per sensor (bounded forward fill applied) and ``<sensor>__missing`` (Boolean: no
observation at that grid point, so the value is filled or null). The ingest replaces files atomically
(written under a temporary name, then renamed).
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path
from urllib.parse import quote

import polars as pl

from pipelines.config import EquipmentType

DATA_FILE = "part-0.parquet"
TS = "timestamp"
UTC_US = pl.Datetime("us", "UTC")


def store_schema(etype: EquipmentType) -> dict[str, pl.DataType]:
    """Column order and dtypes of every store file of an equipment type."""
    schema: dict[str, pl.DataType] = {TS: UTC_US}
    schema.update({s.name: pl.Float64 for s in etype.sensors})
    schema.update({f"{s.name}__missing": pl.Boolean for s in etype.sensors})
    return schema


def equipment_dir(store: Path, etype: str, equipment: str) -> Path:
    return store / f"equipment_type={quote(etype, safe='')}" / f"equipment={quote(equipment, safe='')}"


def partition_file(store: Path, etype: str, equipment: str, day: date) -> Path:
    return equipment_dir(store, etype, equipment) / f"date={day.isoformat()}" / DATA_FILE


Pending = dict[tuple[str, date], Path]  # (equipment, day) -> a file written in this run, not yet in the store


def read_days(store: Path, etype: EquipmentType, equipment: str, days: list[date],
              pending: Pending | None = None) -> pl.DataFrame:
    """The stored rows of the given days (empty frame with the store schema when none exist); files in
    ``pending`` (written earlier in the same run) take the place of the store's."""
    pending = pending or {}
    files = [p for d in sorted(set(days))
             if (p := pending.get((equipment, d)) or partition_file(store, etype.name, equipment, d)).exists()]
    schema = store_schema(etype)
    if not files:
        return pl.DataFrame(schema=schema)
    frames = [pl.read_parquet(f) for f in files]
    return pl.concat([_conform(f, schema) for f in frames], how="vertical").sort(TS)


def read_range(store: Path, etype: EquipmentType, equipment: str, start: date, end: date,
               pending: Pending | None = None) -> pl.DataFrame:
    days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    return read_days(store, etype, equipment, days, pending)


def _conform(df: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Add sensors that a file predates (null value, missing) and order columns as the schema says."""
    cols = []
    for name, dtype in schema.items():
        if name in df.columns:
            cols.append(pl.col(name).cast(dtype))
        else:
            cols.append(pl.lit(True if dtype == pl.Boolean else None, dtype).alias(name))
    return df.select(cols)


def scan_store(store: str | Path, equipment_type: str | None = None, equipment: str | None = None) -> pl.LazyFrame:
    """Lazily read the store (partition columns equipment_type, equipment, date come back as columns)."""
    store = Path(store)
    et = f"equipment_type={quote(equipment_type, safe='')}" if equipment_type else "equipment_type=*"
    eq = f"equipment={quote(equipment, safe='')}" if equipment else "equipment=*"
    pattern = store / et / eq / "date=*" / "*.parquet"
    if not list(store.glob(str(pattern.relative_to(store)))):
        raise FileNotFoundError(f"no ingested data under {store} matching {et}/{eq}")
    return pl.scan_parquet(str(pattern), hive_partitioning=True, hive_schema={
        "equipment_type": pl.String, "equipment": pl.String, "date": pl.Date}, missing_columns="insert")
