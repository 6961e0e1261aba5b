"""Stage B: one equipment's staged rows -> deduplicated, checked and aligned to its regular grid.

Runs in memory on one equipment's rows of one ingest batch (that is the memory bound of the ingest).
Steps: resolve repeated DST hours, split off rows at or before the watermark (already stored -> counted
as deduplicated; otherwise quarantined), drop exact duplicates, quarantine conflicting duplicates, count
nulls per reason, bucket readings onto the grid (the value at grid time T is the last reading in
(T - grid, T]), detect stuck sensors, merge with the stored rows around the batch, forward fill at most
``max_ffill`` steps and mark every grid point without an observation in ``<sensor>__missing``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from pipelines.config import EquipmentType, SourceConfig
from pipelines.ingest.quality import CODE, VALUE_REASONS, RowReason
from pipelines.ingest.store import TS, UTC_US, Pending, month_of, months_between, read_months, store_schema

_MAX_LISTED = 20  # gaps / stuck runs listed per equipment in the report (all are counted)


@dataclass
class EquipmentOutcome:
    """What stage B produced for one equipment."""

    equipment: str
    kept: int = 0
    deduplicated: dict[str, int] = field(default_factory=dict)  # exact_duplicate / already_stored
    quarantined: pl.DataFrame | None = None  # _file, _line, _reason
    per_file: pl.DataFrame | None = None  # _file, kept, deduplicated, quarantined
    nulled: dict[str, dict[str, int]] = field(default_factory=dict)  # sensor -> reason -> count
    empty: int = 0
    ambiguous_resolved: int = 0
    stuck: list[dict] = field(default_factory=list)
    stuck_count: int = 0
    gaps: list[dict] = field(default_factory=list)
    gap_count: int = 0
    gap_steps: int = 0
    unobserved_sensors: list[str] = field(default_factory=list)
    max_ts: datetime | None = None
    result: pl.DataFrame | None = None  # store rows to write (store schema): whole months, one file each


def bucket_expr(ts: pl.Expr, grid: str) -> pl.Expr:
    """Grid point of a reading: the first grid time at or after it (as-of alignment)."""
    tr = ts.dt.truncate(grid)
    return pl.when(tr < ts).then(tr.dt.offset_by(grid)).otherwise(tr)


def ceil_to_grid(t: datetime, grid: str) -> datetime:
    return pl.select(bucket_expr(pl.lit(t, UTC_US), grid)).item()


def process_equipment(df: pl.DataFrame, src: SourceConfig, etype: EquipmentType, equipment: str,
                      watermark: datetime | None, store: Path, pending: Pending | None = None) -> EquipmentOutcome:
    """Stage B for one equipment. ``df`` holds its usable staged rows (see readers.py for columns), all of
    them, or one chunk of whole staging periods at a time in time order (``watermark`` then being the newest
    time of the chunks before, and ``pending`` the store files they produced)."""
    long = src.layout == "long"
    out = EquipmentOutcome(equipment=equipment)
    key = ["sensor", TS] if long else [TS]  # long: the readings of each sensor in time order
    values = ["value"] if long else etype.sensor_names
    quarantine: list[pl.DataFrame] = []

    df, out.ambiguous_resolved = _resolve_ambiguous(df, src, long)
    dedup_rows: list[pl.DataFrame] = []
    if watermark is not None:
        late_mask = df[TS] <= watermark
        if late_mask.any():
            late = df.filter(late_mask)
            df = df.filter(~late_mask)
            matched = _matches_store(late, src, etype, equipment, store, long, pending)
            stored, not_stored = late.filter(matched), late.filter(~matched)
            out.deduplicated["already_stored"] = stored.height
            dedup_rows.append(stored.select("_file"))
            if not_stored.height:
                quarantine.append(_qrows(not_stored, "before_watermark"))

    df = _sorted(df, key)
    df, exact, conflicts = _duplicates(df, key, values)
    if exact.height:
        out.deduplicated["exact_duplicate"] = exact.height
        dedup_rows.append(exact.select("_file"))
    if conflicts.height:
        quarantine.append(_qrows(conflicts, "conflicting_duplicate"))

    out.kept = df.height
    out.quarantined = pl.concat(quarantine) if quarantine else pl.DataFrame(
        schema={"_file": pl.Int32, "_line": pl.Int64, "_reason": RowReason})
    out.per_file = _per_file(df, dedup_rows, out.quarantined)
    out.nulled, out.empty = _null_counts(df, etype, long)
    if df.height:
        out.max_ts = df[TS].max()

    obs = _observations(df, src, etype, long)
    out.unobserved_sensors = [s for s in etype.sensor_names if obs[s].null_count() == obs.height]
    _stuck(obs, src, etype, out)
    if obs.height:
        _align(obs, src, etype, equipment, watermark, store, out, pending)
    return out


def _resolve_ambiguous(df: pl.DataFrame, src: SourceConfig, long: bool) -> tuple[pl.DataFrame, int]:
    """Pick the UTC reading of each local time; for 'infer', a repeated hour is recognised by time going
    backwards in file order (the second pass through the hour is the later, standard-time reading)."""
    n_amb = int(df["_amb"].sum()) if df.height else 0
    if n_amb == 0 or src.ambiguous == "earliest":
        return df.with_columns(pl.col("ts_e").alias(TS)), n_amb
    if src.ambiguous == "latest":
        return df.with_columns(pl.coalesce("ts_l", "ts_e").alias(TS)), n_amb
    group = ["_file", "sensor"] if long else ["_file"]
    amb = (
        df.filter("_amb").select("_file", "_line", *(["sensor"] if long else []), "ts_e").sort("_file", "_line")
        .with_columns((pl.col("ts_e").cum_max().shift(1).over(group) > pl.col("ts_e")).fill_null(False)
                      .alias("_second"))
        .select("_file", "_line", "_second")
    )
    df = df.join(amb, on=["_file", "_line"], how="left", maintain_order="left")
    ts = pl.when(pl.col("_second").fill_null(False)).then(pl.col("ts_l")).otherwise(pl.col("ts_e"))
    return df.with_columns(ts.alias(TS)).drop("_second"), n_amb


def _sorted(df: pl.DataFrame, key: list[str]) -> pl.DataFrame:
    """``df`` sorted by (*key, _file, _line). The staged rows of a log in time order already are (checked, at a
    fraction of a sort's cost). A historian's long log interleaves tags whose clocks differ, but each tag's
    readings are in time order: for a key led by the sensor, rows not grouped by sensor get a stable sort on that
    one small column first, and the full sort only when the order check still fails."""
    if key[0] == "sensor" and not df["sensor"].to_physical().is_sorted():
        df = df.sort("sensor", maintain_order=True)
    if _in_order(df, key):
        return df
    return df.sort([*key, "_file", "_line"], maintain_order=True)


def _in_order(df: pl.DataFrame, key: list[str]) -> bool:
    """Whether the rows are already sorted by (*key, _file, _line), as staged rows of a log in time order are:
    checking costs a fraction of sorting them again."""
    if df.height < 2:
        return True
    later = pl.lit(True)  # rows equal in every column are in order
    for c in reversed([*key, "_file", "_line"]):  # lexicographic: a later column decides only on ties
        d = pl.col(c).to_physical().cast(pl.Int64).diff()
        later = (d > 0) | ((d == 0) & later)
    return bool(df.select(later.slice(1).fill_null(False).all()).item())


def _qrows(df: pl.DataFrame, reason: str) -> pl.DataFrame:
    return df.select("_file", "_line", pl.lit(reason, RowReason).alias("_reason"))


def _duplicates(df: pl.DataFrame, key: list[str], values: list[str]
                ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Split off exact duplicates (same key and values) and conflicting ones (same key, other values).

    ``df`` must be sorted by key; only rows whose key equals a neighbour's are examined further. Every
    version of a conflicting key is quarantined: which one is right cannot be known.
    """
    if df.height < 2:
        return df, df.clear(), df.clear()
    same_prev = pl.all_horizontal([pl.col(k) == pl.col(k).shift(1) for k in key]).fill_null(False)
    same_next = pl.all_horizontal([pl.col(k) == pl.col(k).shift(-1) for k in key]).fill_null(False)
    df = df.with_row_index("_ri")
    cand = df.filter(same_prev | same_next)
    if not cand.height:
        return df.drop("_ri"), df.clear().drop("_ri"), df.clear().drop("_ri")
    cand = cand.with_columns((~pl.struct([*key, *values]).is_first_distinct()).alias("_exact"))
    exact = cand.filter("_exact")
    rest = cand.filter(~pl.col("_exact"))
    conflicts = rest.filter(pl.struct(key).is_duplicated())
    drop = pl.concat([exact["_ri"], conflicts["_ri"]])
    kept = df.filter(pl.repeat(True, df.height, eager=True).scatter(drop, False)).drop("_ri")
    return kept, exact.drop("_ri", "_exact"), conflicts.drop("_ri", "_exact")


def _per_file(kept: pl.DataFrame, dedup: list[pl.DataFrame], quarantined: pl.DataFrame) -> pl.DataFrame:
    parts = [kept.group_by("_file").agg(pl.len().alias("kept"))]
    if dedup:
        parts.append(pl.concat(dedup).group_by("_file").agg(pl.len().alias("deduplicated")))
    parts.append(quarantined.group_by("_file").agg(pl.len().alias("quarantined")))
    out = pl.DataFrame(schema={"_file": pl.Int32})
    for p in parts:
        out = out.join(p, on="_file", how="full", coalesce=True)
    for c in ("kept", "deduplicated", "quarantined"):
        out = out.with_columns(pl.col(c).fill_null(0).cast(pl.Int64)) if c in out.columns else out.with_columns(
            pl.lit(0, pl.Int64).alias(c))
    return out


def _null_counts(df: pl.DataFrame, etype: EquipmentType, long: bool) -> tuple[dict[str, dict[str, int]], int]:
    nulled: dict[str, dict[str, int]] = {}
    empty = 0
    if long:  # usable values (code ok) are most of them and not counted: filtered out first
        counts = df.filter(pl.col("value__why") != CODE["ok"]).group_by("sensor", "value__why").len()
        rows = [(str(s), int(c), int(n)) for s, c, n in counts.iter_rows()]
    else:
        rows = []
        for s in etype.sensor_names:
            why = df[f"{s}__why"]
            vc = why.filter(why != CODE["ok"]).value_counts()
            rows += [(s, int(c), int(n)) for c, n in vc.iter_rows()]
    for sensor, code, n in rows:
        if code == CODE["empty"]:
            empty += n
        elif code != CODE["ok"]:
            nulled.setdefault(sensor, {})
            nulled[sensor][VALUE_REASONS[code]] = nulled[sensor].get(VALUE_REASONS[code], 0) + n
    return nulled, empty


def _observations(df: pl.DataFrame, src: SourceConfig, etype: EquipmentType, long: bool) -> pl.DataFrame:
    """One row per grid point with at least one reading: the last non-null reading of each sensor."""
    sensors = etype.sensor_names
    bucket = bucket_expr(pl.col(TS), src.grid).alias(TS)
    if long:
        usable = pl.col("value").is_not_null() & pl.col("sensor").is_not_null()
        obs = _long_observations(df.filter(usable).select(bucket, "sensor", "value"), sensors)
    else:
        obs = df.select(bucket, *sensors)  # sorted by time, so the buckets are too
        shared = (pl.col(TS) == pl.col(TS).shift(1)) | (pl.col(TS) == pl.col(TS).shift(-1))
        obs = obs.with_columns(shared.fill_null(False).alias("_shared"))
        if obs["_shared"].any():  # several readings in one grid interval: only those rows are aggregated
            merged = obs.filter("_shared").group_by(TS, maintain_order=True).agg(
                pl.col(s).drop_nulls().last() for s in sensors)
            obs = pl.concat([obs.filter(~pl.col("_shared")).drop("_shared"), merged]).sort(TS)
        else:
            obs = obs.drop("_shared")
    obs = obs.filter(pl.any_horizontal(pl.col(sensors).is_not_null())) if sensors else obs
    return obs.sort(TS).with_columns(pl.col(TS).cast(UTC_US), pl.col(sensors).cast(pl.Float64))


def _long_observations(o: pl.DataFrame, sensors: list[str]) -> pl.DataFrame:
    """Long rows (grid point, sensor, value), sorted by sensor and time, values finite (not null) -> one row per grid
    point with a reading: per sensor the last reading at that point (the last of its run of equal points)."""
    if not o.height:
        return pl.DataFrame(schema={TS: UTC_US, **{s: pl.Float64 for s in sensors}})
    t = o[TS].cast(UTC_US).to_physical().to_numpy()
    code = o["sensor"].to_physical().to_numpy()
    value = o["value"].to_numpy()
    last = np.ones(len(t), dtype=bool)
    last[:-1] = (code[1:] != code[:-1]) | (t[1:] != t[:-1])
    categories = o["sensor"].dtype.categories.to_list()
    column = np.array([sensors.index(c) if c in sensors else -1 for c in categories], dtype=np.int64)[code]
    last &= column >= 0
    t, column, value = t[last], column[last], value[last]
    order = np.argsort(t, kind="stable")  # merges the sensors' sorted runs (timsort finds them): fast
    ordered = t[order]
    first = np.ones(len(t), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    row = np.empty(len(t), dtype=np.int64)
    row[order] = np.cumsum(first) - 1  # each reading's output row (its grid point's rank)
    points = ordered[first]
    grid = np.full((len(points), len(sensors)), np.nan)  # NaN = no reading (the values themselves are finite)
    grid[row, column] = value  # one value per (point, sensor) after `last`
    return pl.DataFrame([pl.Series(TS, points).cast(pl.Int64).cast(UTC_US).set_sorted(),
                         *[pl.Series(s, grid[:, j], nan_to_null=True) for j, s in enumerate(sensors)]])


def _stuck(obs: pl.DataFrame, src: SourceConfig, etype: EquipmentType, out: EquipmentOutcome) -> None:
    """Runs of more than N identical consecutive observations of a sensor."""
    limits = {s.name: (s.stuck_steps if s.stuck_steps is not None else src.stuck_steps) for s in etype.sensors}
    limits = {k: n for k, n in limits.items() if n > 0}
    if not limits or not obs.height:
        return
    # the longest run of equal values per sensor, all sensors in one query; runs are listed only where needed
    longest = obs.select(pl.col(k).drop_nulls().rle().struct.field("len").max().alias(k) for k in limits).row(
        0, named=True)
    for s in etype.sensors:
        n = limits.get(s.name, 0)
        if n <= 0 or (longest[s.name] or 0) <= n:
            continue
        seen = obs.select(TS, s.name).filter(pl.col(s.name).is_not_null())
        runs = (
            seen.select(pl.col(s.name).rle().alias("_r")).unnest("_r")
            .with_columns((pl.col("len").cum_sum() - pl.col("len")).alias("_i"))  # row of the run's first value
            .filter(pl.col("len") > n)
        )
        out.stuck_count += runs.height
        for steps, value, i in runs.head(_MAX_LISTED - len(out.stuck)).select("len", "value", "_i").iter_rows():
            out.stuck.append({"equipment": out.equipment, "sensor": s.name, "start": seen[TS][i].isoformat(),
                              "end": seen[TS][i + steps - 1].isoformat(), "steps": steps, "value": value})


def _align(obs: pl.DataFrame, src: SourceConfig, etype: EquipmentType, equipment: str,
           watermark: datetime | None, store: Path, out: EquipmentOutcome, pending: Pending | None) -> None:
    """Merge new observations with the stored rows around them and lay them on the grid.

    The result replaces whole month files: the stored rows of the month of the first new grid point before
    it, then every grid point from there to the last observation (stored or new) of the months read."""
    sensors = etype.sensor_names
    g = src.grid_timedelta
    f = src.max_ffill
    b0, bmax = obs[TS].min(), obs[TS].max()
    r0 = b0 if watermark is None else min(b0, ceil_to_grid(watermark, src.grid) + g)
    ctx_start = r0 - f * g
    month0 = datetime.combine(month_of(r0), datetime.min.time(), tzinfo=r0.tzinfo)
    # from the fill's context (maybe in the month before) to the end of the last month touched
    old = read_months(store, etype, equipment, months_between(ctx_start.date(), bmax.date()), pending,
                      since=min(ctx_start, month0))
    if old.height:
        old_obs = old.filter(pl.col(TS) >= ctx_start).select(
            TS, *[pl.when(~pl.col(f"{s}__missing")).then(pl.col(s)).alias(s) for s in sensors])
        merged = old_obs.join(obs, on=TS, how="full", coalesce=True, suffix="__new")
        merged = merged.select(TS, *[pl.coalesce(f"{s}__new", s).alias(s) for s in sensors])
        merged = merged.filter(pl.any_horizontal(pl.col(sensors).is_not_null())).sort(TS)
    else:
        merged = obs
    start = min(merged[TS].min(), r0)
    end = max(merged[TS].max(), old[TS].max()) if old.height else merged[TS].max()  # keep a stored tail
    grid = pl.DataFrame({TS: pl.datetime_range(start, end, src.grid, time_unit="us", time_zone="UTC", eager=True)})
    aligned = grid.join(merged, on=TS, how="left", maintain_order="left").select(
        TS,
        *[pl.col(s).forward_fill(limit=f) if f else pl.col(s) for s in sensors],
        *[pl.col(s).is_null().alias(f"{s}__missing") for s in sensors],
    )
    new_rows = aligned.filter(pl.col(TS) >= r0)
    kept_old = old.filter((pl.col(TS) < r0) & (pl.col(TS) >= month0)) if old.height else old
    result = new_rows.select(store_schema(etype).keys())  # the grid is in time order
    if kept_old.height:
        result = pl.concat([kept_old, result], how="vertical").sort(TS)
    out.result = result
    _gaps(merged, b0, src, out)


def _gaps(merged: pl.DataFrame, b0: datetime, src: SourceConfig, out: EquipmentOutcome) -> None:
    """Stretches with no observation longer than the forward fill covers, ending in the new data."""
    g = src.grid_timedelta
    limit = (src.max_ffill + 1) * g
    t = merged.select(pl.col(TS), (pl.col(TS) - pl.col(TS).shift(1)).alias("dt")).filter(
        (pl.col("dt") > limit) & (pl.col(TS) >= b0))
    out.gap_count += t.height
    for ts_, dt in t.iter_rows():
        steps = int(dt / g) - 1
        out.gap_steps += steps
        if len(out.gaps) < _MAX_LISTED:
            out.gaps.append({"equipment": out.equipment, "start": (ts_ - dt + g).isoformat(),
                             "end": (ts_ - g).isoformat(), "missing_steps": steps})


def _matches_store(late: pl.DataFrame, src: SourceConfig, etype: EquipmentType, equipment: str, store: Path,
                   long: bool, pending: Pending | None) -> pl.Series:
    """For rows at or before the watermark: does the store already hold the same values at their grid point?"""
    late = late.with_columns(bucket_expr(pl.col(TS), src.grid).alias("_b"))
    months = {month_of(d) for d in late["_b"].dt.date().unique().to_list()}
    old = read_months(store, etype, equipment, months, pending)
    if not old.height:
        return pl.Series([False] * late.height)
    sensors = etype.sensor_names
    if long:
        old_long = old.unpivot(index=TS, on=sensors, variable_name="_s", value_name="_old").join(
            old.unpivot(index=TS, on=[f"{s}__missing" for s in sensors], variable_name="_sm", value_name="_miss")
            .with_columns(pl.col("_sm").str.strip_suffix("__missing").alias("_s")).drop("_sm"),
            on=[TS, "_s"])
        j = late.with_columns(pl.col("sensor").cast(pl.String).alias("_s")).join(
            old_long, left_on=["_b", "_s"], right_on=[TS, "_s"], how="left", maintain_order="left")
        ok = pl.col("value").is_null() | ((~pl.col("_miss")) & (pl.col("_old") == pl.col("value")))
        return j.select(ok.fill_null(False)).to_series()
    right = old.rename({s: f"{s}__old" for s in sensors} | {TS: "_b"})
    j = late.join(right, on="_b", how="left", maintain_order="left")
    ok = pl.all_horizontal([
        pl.col(s).is_null() | ((~pl.col(f"{s}__missing")) & (pl.col(f"{s}__old") == pl.col(s))) for s in sensors
    ]) & pl.col(f"{sensors[0]}__missing").is_not_null()
    return j.select(ok.fill_null(False)).to_series()
