"""Cleaning expressions: timestamps to UTC, text values to numbers, quality codes, limits.

Every value that is turned into null gets a reason code (``<sensor>__why``, UInt8) so that the report can
count nulls per reason; every row that cannot be used at all gets a row reason and goes to quarantine.
"""

from __future__ import annotations

import polars as pl

from pipelines.config import SensorConfig, SourceConfig

# Value reason codes. 0 = a usable value; 1 = empty in the input (missing, not nulled by us).
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


def has_offset(fmt: str | None) -> bool:
    """True when a timestamp format carries its own UTC offset (then the configured zone is not used)."""
    return fmt is not None and any(t in fmt for t in ("%z", "%:z", "%::z", "%#z"))


def parse_timestamps(raw: pl.Expr, src: SourceConfig, dtype: pl.DataType | None = None) -> dict[str, pl.Expr]:
    """Local text (or datetimes) to UTC, both readings of an ambiguous local time, and DST flags.

    Returns expressions ``parsed`` (not null when the text matched the format), ``ts_e`` / ``ts_l`` (UTC,
    the earlier / later reading of a repeated local time at DST end; equal elsewhere), ``amb`` (the local
    time occurs twice) and ``nonexistent`` (the local time falls in the DST gap).
    """
    if dtype is not None and isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
        utc = raw.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
        return {"parsed": utc, "ts_e": utc, "ts_l": utc, "amb": pl.lit(False), "nonexistent": pl.lit(False)}
    if dtype is not None and isinstance(dtype, pl.Datetime | pl.Date):
        naive = raw.cast(pl.Datetime("us"))
    else:
        fmt = src.timestamp_format
        if fmt is None:
            raise ValueError(f"source {src.name!r}: timestamp_format is needed for text timestamps")
        if has_offset(fmt):
            utc = raw.str.to_datetime(fmt, strict=False, time_unit="us", time_zone="UTC")
            return {"parsed": utc, "ts_e": utc, "ts_l": utc, "amb": pl.lit(False), "nonexistent": pl.lit(False)}
        naive = raw.str.to_datetime(fmt, strict=False, time_unit="us")
    if src.timezone == "UTC":
        utc = naive.dt.replace_time_zone("UTC")
        return {"parsed": naive, "ts_e": utc, "ts_l": utc, "amb": pl.lit(False), "nonexistent": pl.lit(False)}
    ts_e = naive.dt.replace_time_zone(src.timezone, ambiguous="earliest", non_existent="null")
    ts_l = naive.dt.replace_time_zone(src.timezone, ambiguous="latest", non_existent="null")
    ts_e, ts_l = ts_e.dt.convert_time_zone("UTC"), ts_l.dt.convert_time_zone("UTC")
    return {"parsed": naive, "ts_e": ts_e, "ts_l": ts_l, "amb": (ts_e != ts_l).fill_null(False),
            "nonexistent": naive.is_not_null() & ts_e.is_null()}


def quality_class(q: pl.Expr) -> pl.Expr:
    """OPC UA quality words (Good / Uncertain / Bad, with any suffix such as Bad_SensorFailure) to a class.

    Empty quality means good (no information); anything else unrecognised is Q_UNKNOWN (treated as bad).
    """
    low = q.str.strip_chars().str.to_lowercase()
    return (
        pl.when(q.is_null() | (low == "") | low.str.starts_with("good")).then(pl.lit(Q_GOOD, pl.UInt8))
        .when(low.str.starts_with("uncertain")).then(pl.lit(Q_UNCERTAIN, pl.UInt8))
        .when(low.str.starts_with("bad")).then(pl.lit(Q_BAD, pl.UInt8))
        .otherwise(pl.lit(Q_UNKNOWN, pl.UInt8))
    )


def clean_value(raw: pl.Expr, src: SourceConfig, sensor: SensorConfig | None, dtype: pl.DataType,
                quality: pl.Expr | None = None) -> tuple[pl.Expr, pl.Expr]:
    """A raw value column (text or numbers) to (Float64 value, UInt8 reason code).

    The value is null unless the code is 0. ``sensor`` None means per-row limits are applied later (long
    layout, where each row is a different sensor: see `apply_limits_long`).
    """
    if dtype == pl.String:
        text = raw.str.replace(",", ".", literal=True) if src.decimal_comma else raw
        fast = text.cast(pl.Float64, strict=False)
        # The slower string work only touches values the plain cast rejected (the rest are masked to null).
        odd = pl.when(fast.is_null()).then(text).str.strip_chars()
        num = pl.coalesce(fast, odd.cast(pl.Float64, strict=False))
        words = [w.lower() for w in src.state_words]
        is_word = odd.str.to_lowercase().is_in(words) if words else pl.lit(False)
        unparsed = num.is_null()
    elif dtype.is_numeric() or dtype == pl.Boolean:
        num, is_word, unparsed = raw.cast(pl.Float64), pl.lit(False), pl.lit(False)
    else:
        raise TypeError(f"values of type {dtype} are not numbers or text")
    code = pl.when(raw.is_null()).then(pl.lit(CODE["empty"], pl.UInt8))
    if quality is not None:
        qc = quality_class(quality)
        code = code.when(qc == Q_BAD).then(pl.lit(CODE["quality_bad"], pl.UInt8))
        if not src.keep_uncertain:
            code = code.when(qc == Q_UNCERTAIN).then(pl.lit(CODE["quality_uncertain"], pl.UInt8))
        code = code.when(qc == Q_UNKNOWN).then(pl.lit(CODE["quality_unknown"], pl.UInt8))
    code = (
        code.when(unparsed & is_word).then(pl.lit(CODE["state_word"], pl.UInt8))
        .when(unparsed).then(pl.lit(CODE["not_numeric"], pl.UInt8))
        .when(~num.is_finite()).then(pl.lit(CODE["not_finite"], pl.UInt8))
    )
    if src.sentinels:
        code = code.when(num.is_in(list(src.sentinels))).then(pl.lit(CODE["sentinel"], pl.UInt8))
    if sensor is not None:
        out = _out_of_range(num, sensor)
        if out is not None:
            code = code.when(out).then(pl.lit(CODE["out_of_range"], pl.UInt8))
    code = code.otherwise(pl.lit(CODE["ok"], pl.UInt8))
    return num, code


def _out_of_range(num: pl.Expr, sensor: SensorConfig) -> pl.Expr | None:
    conds = []
    if sensor.min is not None:
        conds.append(num < sensor.min)
    if sensor.max is not None:
        conds.append(num > sensor.max)
    if not conds:
        return None
    return conds[0] if len(conds) == 1 else conds[0] | conds[1]


def apply_limits_long(value: pl.Expr, code: pl.Expr, sensor: pl.Expr, sensors: tuple[SensorConfig, ...]
                      ) -> pl.Expr:
    """Reason code after the per-sensor physical limits of long-layout rows (sensor name per row)."""
    lo = {s.name: s.min for s in sensors if s.min is not None}
    hi = {s.name: s.max for s in sensors if s.max is not None}
    if not lo and not hi:
        return code
    name = sensor.cast(pl.String)
    lo_e = name.replace_strict(lo, default=None, return_dtype=pl.Float64) if lo else pl.lit(None, pl.Float64)
    hi_e = name.replace_strict(hi, default=None, return_dtype=pl.Float64) if hi else pl.lit(None, pl.Float64)
    out = ((value < lo_e).fill_null(False)) | ((value > hi_e).fill_null(False))
    return pl.when((code == CODE["ok"]) & out).then(pl.lit(CODE["out_of_range"], pl.UInt8)).otherwise(code)


def final_value(num: pl.Expr, code: pl.Expr) -> pl.Expr:
    """The cleaned value: the number where the code says ok, else null."""
    return pl.when(code == CODE["ok"]).then(num).otherwise(None)
