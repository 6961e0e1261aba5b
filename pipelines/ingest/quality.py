"""Cleaning expressions: timestamps to UTC, text values to numbers, quality codes, limits.

Every value that is turned into null gets a reason code (``<sensor>__why``, UInt8) so that the report can
count nulls per reason; every row that cannot be used at all gets a row reason and goes to quarantine.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from pipelines.config import SensorConfig, SourceConfig

# Value reason codes. 0 = a usable value; 1 = empty in the input (missing or only blanks, not nulled by us).
VALUE_REASONS: dict[int, str] = {
    0: "ok", 1: "empty", 2: "state_word", 3: "not_numeric", 4: "not_finite", 5: "sentinel",
    6: "quality_bad", 7: "quality_uncertain", 8: "quality_unknown", 9: "out_of_range",
}
CODE = {name: code for code, name in VALUE_REASONS.items()}

# Row reasons. "blank" lines are neither rows in nor quarantined; all others go to quarantine.
ROW_REASONS = (
    "blank", "ragged_line", "invalid_utf8", "missing_timestamp", "bad_timestamp", "dst_nonexistent",
    "dst_ambiguous", "missing_equipment_id", "bad_tag", "unknown_sensor", "conflicting_duplicate",
    "before_watermark",
)
RowReason = pl.Enum(ROW_REASONS)

# Quality classes for value/quality pairs.
Q_GOOD, Q_UNCERTAIN, Q_BAD, Q_UNKNOWN = 0, 1, 2, 3


Stages = list[list[pl.Expr]]  # each inner list is one with_columns step; a step may use earlier columns


def merge_stages(*parts: Stages) -> Stages:
    """Zip several stage lists so that step k of each runs in the same with_columns."""
    n = max((len(p) for p in parts), default=0)
    return [[e for p in parts if k < len(p) for e in p[k]] for k in range(n)]


def has_offset(fmt: str | None) -> bool:
    """True when a timestamp format carries its own UTC offset (then the configured zone is not used)."""
    return fmt is not None and any(t in fmt for t in ("%z", "%:z", "%::z", "%#z"))


def timestamp_stages(raw: str, src: SourceConfig, dtype: pl.DataType, table: HourTable | None = None) -> Stages:
    """Local text (or datetimes) in column ``raw`` to UTC.

    Adds ``_parsed`` (null when the text does not match the format), ``ts_e`` / ``ts_l`` (UTC; the earlier /
    later reading of a local time repeated at DST end, equal elsewhere), ``_amb`` (the local time occurs
    twice) and ``_nonexist`` (it falls in the DST gap). Intermediate results are columns, not repeated
    expressions, so each parse runs once. With a ``table`` of the zone's hours (local times to convert), the
    conversion is a lookup in polars and ``_tzx`` marks the rows it could not convert (see `table_stages`).
    """
    col = pl.col(raw)
    no_dst = [pl.lit(False).alias("_amb"), pl.lit(False).alias("_nonexist")]
    if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
        utc = col.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
        return [[utc.alias("_parsed")], [pl.col("_parsed").alias("ts_e"), pl.col("_parsed").alias("ts_l"), *no_dst]]
    if isinstance(dtype, pl.Datetime | pl.Date):
        parsed = col.cast(pl.Datetime("us"))
    else:
        fmt = src.timestamp_format
        if fmt is None:
            raise ValueError(f"source {src.name!r}: timestamp_format is needed for text timestamps")
        # cache=False: a per-batch cache of distinct texts only costs when nearly every text is distinct
        if has_offset(fmt):
            utc = col.str.to_datetime(fmt, strict=False, time_unit="us", time_zone="UTC", cache=False)
            return [[utc.alias("_parsed")],
                    [pl.col("_parsed").alias("ts_e"), pl.col("_parsed").alias("ts_l"), *no_dst]]
        parsed = col.str.to_datetime(fmt, strict=False, time_unit="us", cache=False)
    naive = pl.col("_parsed")
    if src.timezone == "UTC":
        utc = naive.dt.replace_time_zone("UTC")
        return [[parsed.alias("_parsed")], [utc.alias("ts_e"), utc.alias("ts_l"), *no_dst]]
    if table is not None:
        return [[parsed.alias("_parsed")], *table_stages(table)]
    # local -> UTC converts each distinct hour of a batch (its first and last instant), not each row: polars'
    # conversion costs ~110 ns a row and is needed twice (the earlier and the later reading)
    conv = naive.map_batches(local_to_utc(src.timezone), return_dtype=_CONVERTED, is_elementwise=True)
    return [
        [parsed.alias("_parsed")],
        [conv.alias("_utc")],
        [pl.col("_utc").struct.field(f).alias(f) for f in _CONVERTED.to_schema()],
    ]


_CONVERTED = pl.Struct({"ts_e": pl.Datetime("us", "UTC"), "ts_l": pl.Datetime("us", "UTC"), "_amb": pl.Boolean,
                        "_nonexist": pl.Boolean})
_HOUR_US = 3_600_000_000
_TABLE_HOURS = 1 << 20  # the largest hour table: ~120 years of hours, 9 MB


def local_to_utc(tz: str) -> Callable[[pl.Series], pl.Series]:
    """Naive local times (Datetime[us]) of zone ``tz`` -> struct ts_e, ts_l (UTC: the earlier and the later
    reading of a local time the clock passes twice, equal elsewhere, null in a gap), _amb (passed twice) and
    _nonexist (in a gap), exactly as polars' replace_time_zone with ambiguous 'earliest' / 'latest' gives them.

    Local times in an hour whose first and last microsecond have the same UTC offset, neither of them
    repeated, are shifted by that offset (one conversion per hour of the batch's span, or per distinct hour when
    the span is longer than the batch); the rows of the other hours (a clock change inside) are converted one by
    one. An elementwise function, so the streaming engine runs it batch by batch."""

    table: list = []  # [(first hour, offsets by hour - first: int64, regular: bool)], shared by the batches

    def dense(lo: int, hi: int) -> tuple[int, np.ndarray, np.ndarray]:
        """The offsets of hours lo..hi, from the table the batches share (grown to cover them when the union
        stays under _TABLE_HOURS; a log's batches mostly cover the same months)."""
        cur = table[0] if table else None  # read once: batches may run on several threads
        if cur is not None:
            cur_lo, cur_hi = cur[0], cur[0] + len(cur[1]) - 1
            if cur_lo <= lo and hi <= cur_hi:
                return cur
            if max(hi, cur_hi) - min(lo, cur_lo) < _TABLE_HOURS:
                lo, hi = min(lo, cur_lo), max(hi, cur_hi)
        kind, off, _ = _hour_kinds(tz, pl.int_range(lo, hi + 1, dtype=pl.Int64, eager=True) * _HOUR_US)
        entry = (lo, off, kind == HOUR_REGULAR)
        table[:] = [entry]  # one assignment: a batch on another thread sees the old table or the new one
        return entry

    def convert(local: pl.Series) -> pl.Series:
        t_s = local.cast(pl.Int64)
        valid = t_s.is_not_null().to_numpy()
        t = t_s.fill_null(0).to_numpy()
        hour = t // _HOUR_US
        seen = hour[valid]
        ok, utc = valid, t  # no time in the batch: all null
        if len(seen) and seen.max() - seen.min() < max(len(t), 1024):
            # the batch's hours fit a table no longer than the batch (the usual case: a log's rows are roughly in
            # time order): looked up by position, a tenth of the cost of a hash lookup per row
            first, off, reg = dense(int(seen.min()), int(seen.max()))
            idx = np.where(valid, hour - first, 0)
            ok, utc = valid & reg[idx], t - off[idx]
        elif len(seen):
            hours = np.unique(seen)
            kind, off, _ = _hour_kinds(tz, pl.Series(hours * _HOUR_US))
            pos = np.searchsorted(hours, hour).clip(0, len(hours) - 1)  # each row's hour (rows without a time: any)
            ok, utc = valid & (kind[pos] == HOUR_REGULAR), t - off[pos]
        ts = pl.Series(local.name, utc).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
        if not ok.all():  # rows not converted here: null (the odd ones are filled in below)
            ts = ts.scatter(np.flatnonzero(~ok), None)
        flags = np.zeros(len(t), dtype=bool)
        out = pl.DataFrame({"ts_e": ts, "ts_l": ts, "_amb": flags, "_nonexist": flags})
        odd = np.flatnonzero(valid & ~ok)  # hours with a clock change inside: row by row
        if len(odd):
            exact = _polars_local_to_utc(local.gather(odd), tz)
            out = out.with_columns(out[c].scatter(odd, exact[c]) for c in out.columns)
        return out.to_struct(local.name)

    return convert


HOUR_REGULAR, HOUR_REPEATED, HOUR_SKIPPED, HOUR_OTHER = 0, 1, 2, 3


@dataclass(frozen=True, eq=False)
class HourTable:
    """The local hours ``h0`` .. ``h0 + len - 1`` of a zone (hours since 1970 of naive local time): per hour its
    kind and the UTC offsets (us) of the earlier and the later reading of its local times. Kinds: regular (one
    offset all hour), repeated (the clock was set back: every local time of the hour occurs twice), skipped (the
    whole hour lies in a gap), other (the offset changes inside the hour: not convertible by the table)."""

    h0: int
    kind: np.ndarray  # uint8
    off_e: np.ndarray  # int64
    off_l: np.ndarray  # int64

    @classmethod
    def build(cls, tz: str, first_hour: int, last_hour: int) -> HourTable:
        if last_hour < first_hour:
            raise ValueError(f"HourTable: expected first_hour <= last_hour, got {first_hour} > {last_hour}")
        return cls(first_hour, *_hour_kinds(tz, pl.int_range(first_hour, last_hour + 1, dtype=pl.Int64,
                                                              eager=True) * _HOUR_US))

    @classmethod
    def around(cls, tz: str, times: pl.Series, margin_hours: int) -> HourTable | None:
        """The hours from ``margin_hours`` before the earliest of ``times`` (naive local) to as many after the
        latest; None when a time is missing or that is more than _TABLE_HOURS."""
        if times.null_count() or not times.len():
            return None
        hours = times.cast(pl.Datetime("us")).cast(pl.Int64) // _HOUR_US
        lo, hi = int(hours.min()) - margin_hours, int(hours.max()) + margin_hours
        return cls.build(tz, lo, hi) if hi - lo < _TABLE_HOURS else None


def _hour_kinds(tz: str, hours: pl.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per hour (its start, naive local us since 1970): its kind (HOUR_*) and the UTC offsets (us) of the earlier
    and the later reading of its local times (0 unless regular or repeated), from polars' conversion of the hour's
    first and last microsecond."""
    a, b = (_polars_local_to_utc(h.cast(pl.Datetime("us")), tz) for h in (hours, hours + _HOUR_US - 1))

    def offset(at: pl.Series, conv: pl.DataFrame, col: str) -> np.ndarray:
        return (at - conv[col].cast(pl.Int64)).to_numpy()  # NaN where the local time does not exist

    ea, la = offset(hours, a, "ts_e"), offset(hours, a, "ts_l")
    eb, lb = offset(hours + _HOUR_US - 1, b, "ts_e"), offset(hours + _HOUR_US - 1, b, "ts_l")
    amb_a, amb_b = a["_amb"].to_numpy(), b["_amb"].to_numpy()
    gap_a, gap_b = a["_nonexist"].to_numpy(), b["_nonexist"].to_numpy()
    with np.errstate(invalid="ignore"):
        same = (ea == eb) & (la == lb)  # False where either is NaN (a gap)
    kind = np.full(len(hours), HOUR_OTHER, dtype=np.uint8)
    kind[same & ~amb_a & ~amb_b] = HOUR_REGULAR
    kind[same & amb_a & amb_b] = HOUR_REPEATED
    kind[gap_a & gap_b] = HOUR_SKIPPED
    ok = (kind == HOUR_REGULAR) | (kind == HOUR_REPEATED)
    return kind, np.where(ok, ea, 0).astype(np.int64), np.where(ok, la, 0).astype(np.int64)


def table_stages(table: HourTable) -> Stages:
    """``_parsed`` (naive local) -> ts_e, ts_l, _amb, _nonexist by looking each row's hour up in ``table``, all in
    polars (the batch conversion of `local_to_utc` runs Python per batch and holds the GIL: ~5x the CPU). ``_tzx``
    marks rows the table cannot convert (outside its hours, or in an hour whose offset changes inside it): the
    caller converts the file again the exact way when there are any."""
    n = len(table.kind)
    t = pl.col("_parsed").cast(pl.Int64)
    hour = pl.col("_th")
    i = hour.clip(0, n - 1)
    kind = pl.col("_tk")

    def utc(offsets: np.ndarray) -> pl.Expr:
        return (t - pl.lit(pl.Series(offsets)).gather(i)).cast(pl.Datetime("us", "UTC"))

    return [
        [(t // _HOUR_US - table.h0).alias("_th")],
        [pl.when(hour.is_between(0, n - 1)).then(pl.lit(pl.Series(table.kind)).gather(i))
         .when(hour.is_not_null()).then(pl.lit(HOUR_OTHER, pl.UInt8)).alias("_tk")],  # null: no time
        [pl.when(kind <= HOUR_REPEATED).then(utc(table.off_e)).alias("ts_e"),
         pl.when(kind <= HOUR_REPEATED).then(utc(table.off_l)).alias("ts_l"),
         (kind == HOUR_REPEATED).fill_null(False).alias("_amb"),
         (kind == HOUR_SKIPPED).fill_null(False).alias("_nonexist"),
         (kind == HOUR_OTHER).fill_null(False).alias("_tzx")],
    ]


def _polars_local_to_utc(local: pl.Series, tz: str) -> pl.DataFrame:
    """The same conversion, row by row, with polars' time zone functions."""
    n = pl.lit(local)
    e = n.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null").dt.convert_time_zone("UTC")
    late = n.dt.replace_time_zone(tz, ambiguous="latest", non_existent="null").dt.convert_time_zone("UTC")
    return pl.select(e.alias("ts_e"), late.alias("ts_l"), (e != late).fill_null(False).alias("_amb"),
                     (n.is_not_null() & e.is_null()).alias("_nonexist"))


def quality_class(low: pl.Expr) -> pl.Expr:
    """OPC UA quality words (Good / Uncertain / Bad, with any suffix such as Bad_SensorFailure) to a class.

    ``low`` is the quality text stripped and lower-cased. Empty quality means good (no information);
    anything else unrecognised is Q_UNKNOWN (treated as bad).
    """
    return (
        pl.when(low.is_null() | (low == "") | low.str.starts_with("good")).then(pl.lit(Q_GOOD, pl.UInt8))
        .when(low.str.starts_with("uncertain")).then(pl.lit(Q_UNCERTAIN, pl.UInt8))
        .when(low.str.starts_with("bad")).then(pl.lit(Q_BAD, pl.UInt8))
        .otherwise(pl.lit(Q_UNKNOWN, pl.UInt8))
    )


def value_stages(raw: str, out: str, src: SourceConfig, dtype: pl.DataType, sensor: SensorConfig | None = None,
                 quality: str | None = None, row_sensor: tuple[str, tuple[SensorConfig, ...]] | None = None
                 ) -> Stages:
    """Column ``raw`` (text or numbers) to ``out`` (Float64, null unless usable) and ``out__why`` (UInt8 code).

    ``sensor`` gives the physical limits of a wide column; for long rows, ``row_sensor`` = (name of the
    sensor column, an Enum of the sensors in order; the sensors) looks the limits up per row. Temporary
    columns start with ``_t_<out>``. The slow string work only touches the few values that need it: those
    the plain number cast rejects, and qualities other than exactly "Good" (the rest are masked to null).
    """
    t = f"_t_{out}"
    col = pl.col(raw)
    s1: list[pl.Expr] = []
    s2: list[pl.Expr] = []
    s3: list[pl.Expr] = []
    if dtype == pl.String:
        text = col.str.replace(",", ".", literal=True) if src.decimal_comma else col
        s1.append(text.cast(pl.Float64, strict=False).alias(f"{t}_f"))
        s2.append(pl.when(pl.col(f"{t}_f").is_null()).then(text).str.strip_chars().alias(f"{t}_o"))
        odd = pl.col(f"{t}_o")
        # state words match case-insensitively; one regex costs a sixth of lower-casing the (mostly null) column
        words = "|".join(re.escape(w) for w in src.state_words)
        s3 += [pl.coalesce(pl.col(f"{t}_f"), odd.cast(pl.Float64, strict=False)).alias(f"{t}_n"),
               (odd.str.contains(f"(?i)^(?:{words})$") if words else pl.lit(False)).alias(f"{t}_w")]
    elif dtype == pl.Float64:
        s3.append(col.alias(f"{t}_n"))
    elif dtype.is_numeric() or dtype == pl.Boolean:
        s3.append(col.cast(pl.Float64).alias(f"{t}_n"))
    else:
        raise TypeError(f"values of type {dtype} are not numbers or text")
    if quality is not None:
        q = pl.col(quality).cast(pl.String)
        s1.append(pl.when(q != "Good").then(q).str.strip_chars().str.to_lowercase().alias(f"{t}_ql"))
        s2.append(pl.when(q.is_null() | (q == "Good")).then(pl.lit(Q_GOOD, pl.UInt8))
                  .otherwise(quality_class(pl.col(f"{t}_ql"))).alias(f"{t}_q"))
    num, word, qc = pl.col(f"{t}_n"), pl.col(f"{t}_w"), pl.col(f"{t}_q")

    def lit(name: str) -> pl.Expr:
        return pl.lit(CODE[name], pl.UInt8)

    # a field of spaces is as empty as a missing one (the CSV reader's number parser reads it so, too)
    empty = col.is_null() | (pl.col(f"{t}_o") == "") if dtype == pl.String else col.is_null()
    code = pl.when(empty).then(lit("empty"))
    if quality is not None:
        code = code.when(qc == Q_BAD).then(lit("quality_bad"))
        if not src.keep_uncertain:
            code = code.when(qc == Q_UNCERTAIN).then(lit("quality_uncertain"))
        code = code.when(qc == Q_UNKNOWN).then(lit("quality_unknown"))
    if dtype == pl.String:  # a number column is null exactly where the input is empty
        code = code.when(num.is_null() & word).then(lit("state_word")).when(num.is_null()).then(lit("not_numeric"))
    code = code.when(~num.is_finite()).then(lit("not_finite"))
    if src.sentinels:
        code = code.when(num.is_in(list(src.sentinels))).then(lit("sentinel"))
    out_of_range = _out_of_range(num, sensor) if sensor is not None else None
    if row_sensor is not None:
        out_of_range = _out_of_range_rows(num, pl.col(row_sensor[0]), row_sensor[1])
    if out_of_range is not None:
        code = code.when(out_of_range).then(lit("out_of_range"))
    why = f"{out}__why"
    return [s1, s2, s3, [code.otherwise(lit("ok")).alias(why)],
            [pl.when(pl.col(why) == CODE["ok"]).then(num).otherwise(None).alias(out)]]


def _out_of_range(num: pl.Expr, sensor: SensorConfig) -> pl.Expr | None:
    conds = []
    if sensor.min is not None:
        conds.append(num < sensor.min)
    if sensor.max is not None:
        conds.append(num > sensor.max)
    if not conds:
        return None
    return conds[0] if len(conds) == 1 else conds[0] | conds[1]


def _out_of_range_rows(num: pl.Expr, sensor: pl.Expr, sensors: tuple[SensorConfig, ...]) -> pl.Expr | None:
    """Per-row physical limits for long layout; ``sensor`` is an Enum of the sensor names (in order)."""
    if all(s.min is None and s.max is None for s in sensors):
        return None
    idx = sensor.to_physical()
    lo = pl.lit(pl.Series([s.min for s in sensors], dtype=pl.Float64)).gather(idx)
    hi = pl.lit(pl.Series([s.max for s in sensors], dtype=pl.Float64)).gather(idx)
    return (num < lo).fill_null(False) | (num > hi).fill_null(False)
