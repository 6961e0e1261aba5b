"""Stage A: read one log file (csv | parquet, wide | long) into cleaned, staged Arrow IPC files, streaming.

Each file is scanned lazily and sunk to ``<staging>/_part=<equipment>/*.ipc`` (rejected rows under a
reserved partition), so memory stays bounded however large the file: stage B then works on one equipment and a
few periods at a time (``_period`` counts 32-day periods since 1970, UTC). Staged columns:

    _period Int32, _file Int32, _line Int64 (1-based line in the file; data rows of a parquet file count from 1),
    _reason Enum (null for usable rows), ts_e / ts_l Datetime[us, UTC] (earlier / later reading of a
    repeated local time; ts_l is null elsewhere), _amb Boolean (the equipment id is the partition key),
    wide: <sensor> Float64 and <sensor>__why UInt8 per sensor of the equipment type;
    long: sensor Enum, value Float64, value__why UInt8, _tag String (only on unknown-tag rows).

Malformed input either raises ValueError naming the file, line, column and what was expected, or becomes
quarantine rows with a reason: it never disappears silently.
"""

from __future__ import annotations

import csv
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import polars as pl

from pipelines.config import EquipmentType, SourceConfig
from pipelines.ingest.quality import (
    CODE,
    HourTable,
    RowReason,
    has_offset,
    merge_stages,
    timestamp_stages,
    value_stages,
)

REJECTED = "\x1frejected"  # partition key of rejected rows (cannot be an equipment id: control char)
STAGED = "*.ipc"  # the staged files in a partition folder
_OTHER_DELIMITERS = (",", ";", "\t", "|")


@dataclass
class StagedFile:
    """What stage A learned about one file."""

    index: int
    path: Path
    dir: Path
    lines_read: int = 0  # data lines consumed in this run, blank lines included (for append detection)
    rows: int = 0  # non-blank data rows
    blank: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # row reason -> count (stage A quarantine)
    unknown_columns: list[str] = field(default_factory=list)
    missing_sensors: list[str] = field(default_factory=list)  # optional sensors absent from a wide header
    unknown_tags: list[str] = field(default_factory=list)
    sensors_seen: set[str] = field(default_factory=set)
    not_numeric: dict[str, int] = field(default_factory=dict)  # column -> first line with text in it

    def partitions(self) -> dict[str, Path]:
        """Staged partition folders by equipment id; rejected rows under REJECTED."""
        return _partitions(self.dir)


def _partitions(out_dir: Path) -> dict[str, Path]:
    return {unquote(d.name.split("=", 1)[1]): d for d in sorted(out_dir.glob("_part=*")) if d.is_dir()}


# --- CSV header and raw-line checks --------------------------------------------------------------------


def read_csv_header(path: Path, src: SourceConfig) -> list[str]:
    """The column names on line 1, with clear errors for empty files, bad bytes and missing headers."""
    with open(path, "rb") as fh:
        first = fh.readline(1 << 20)
    if not first:
        raise ValueError(f"{path}: empty file (0 bytes); expected a header line naming the columns")
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}, line 1 (header): byte 0x{first[exc.start]:02x} at position {exc.start + 1} "
                         f"is not UTF-8; expected a UTF-8 text file") from None
    text = text.lstrip("\ufeff").rstrip("\r\n")
    if "\x00" in text:
        raise ValueError(f"{path}, line 1: NUL bytes: a binary file, not CSV text (expected a header line)")
    if not text.strip():
        raise ValueError(f"{path}, line 1: blank; expected a header line naming the columns")
    names = [n.strip() for n in next(csv.reader([text], delimiter=src.delimiter))]
    required = [src.timestamp_column]
    if src.layout == "long":
        required += [src.tag_column, src.value_column]
    if src.timestamp_column not in names:
        for other in _OTHER_DELIMITERS:
            if other != src.delimiter and src.timestamp_column in [n.strip() for n in text.split(other)]:
                raise ValueError(f"{path}, line 1: header splits on {other!r}, not on the configured delimiter "
                                 f"{src.delimiter!r} (wrong delimiter? set delimiter = {other!r})")
        if src.timestamp_format and _looks_like_timestamp(names[0], src):
            raise ValueError(f"{path}, line 1: looks like data, not a header (expected a header with columns "
                             f"{', '.join(required)}, got {text[:80]!r})")
    missing = [c for c in required if c not in names]
    if src.layout == "wide" and src.equipment_id_column and src.equipment_id_column not in names:
        missing.append(src.equipment_id_column)
    if src.layout == "long" and src.quality_column and src.quality_column not in names:
        missing.append(src.quality_column)
    if missing:
        raise ValueError(f"{path}, line 1: header has no column {missing[0]!r} (expected columns "
                         f"{', '.join(required)}; got {', '.join(map(repr, names))})")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"{path}, line 1: duplicate column {dups[0]!r} in the header")
    return names


def _looks_like_timestamp(value: str, src: SourceConfig) -> bool:
    fmt = src.timestamp_format
    expr = pl.col("v").str.to_datetime(fmt, strict=False, time_zone="UTC" if has_offset(fmt) else None)
    return pl.DataFrame({"v": [value]}).select(expr.is_not_null()).item()


def _raw_lines(path: Path, skip_lines: int) -> pl.LazyFrame:
    """Physical lines (no CSV parsing) with their 0-based index; blank lines are null."""
    return pl.scan_csv(
        path, has_header=False, separator="\x1f", quote_char=None, schema={"line": pl.String},
        encoding="utf8-lossy", truncate_ragged_lines=True, skip_lines=skip_lines, row_index_name="_i",
        row_index_offset=skip_lines, raise_if_empty=False,
    )


NO_BAD_LINES = pl.DataFrame(schema={"line": pl.Int64, "fields": pl.UInt32, "kind": pl.String, "text": pl.String})


def scan_bad_lines(path: Path, src: SourceConfig, n_columns: int, skip_lines: int) -> tuple[pl.DataFrame, int]:
    """Lines with the wrong number of fields or invalid UTF-8, and the number of physical data lines.

    One streaming pass counting delimiters outside quotes; only the (few) bad lines are collected.
    Returns (frame of line Int64, kind String in {blank, ragged_line, invalid_utf8}, text), n_lines.
    Most files have no bad line: _clean_data_lines shows that far more cheaply.
    """
    n_lines = max(count_lines(path) - max(skip_lines, 1), 0)
    line = pl.col("line")
    unquoted = pl.when(line.str.contains('"', literal=True)).then(line.str.replace_all(r'"[^"]*"', "")).otherwise(line)
    n_sep = unquoted.str.count_matches(src.delimiter, literal=True)
    bad_utf8 = line.str.contains("\ufffd", literal=True)
    lf = _raw_lines(path, skip_lines)
    bad = (
        lf.filter(line.is_null() | (n_sep != n_columns - 1) | bad_utf8)
        .select(
            (pl.col("_i").cast(pl.Int64) + 1).alias("line"),
            (n_sep + 1).alias("fields"),
            pl.when(line.is_null() | (line.str.strip_chars() == "")).then(pl.lit("blank"))
            .when(bad_utf8).then(pl.lit("invalid_utf8"))
            .otherwise(pl.lit("ragged_line")).alias("kind"),
            line.alias("text"),
        )
    )
    bad_df = bad.collect(engine="streaming").filter(pl.col("line") > 1)  # the header is checked apart
    return bad_df, n_lines


_CLEAN_CHUNK = 1 << 20  # small enough to stay in cache (a 16 MB chunk costs twice as much) and to hold the GIL briefly


def _clean_data_lines(path: Path, delimiter: str, n_columns: int, skip_lines: int, exact: bool = True) -> int | None:
    """The common case of scan_bad_lines, in a fraction of its time: the number of data lines (after the header and
    ``skip_lines``) when every one is valid UTF-8 without U+FFFD or quotes and has exactly ``n_columns - 1``
    delimiters. Checked per chunk with bytes methods; any doubt (quotes, bad bytes, a blank or ragged line)
    returns None and the exact polars pass decides.

    ``exact=False`` checks only each chunk's total of delimiters ((n_columns - 1) per line), at a third of the
    cost: a short line then passes when a long one makes up for it, so the count proves every line exact only
    together with a read that fails on any line with too many fields (the optimistic pass of stage_file)."""
    if len(delimiter) != 1 or not delimiter.isascii() or delimiter in '"\n\r' or n_columns < 2:
        return None
    lines = 0
    sep = ord(delimiter)
    drop = bytes(b for b in range(256) if b not in (sep, 10))
    pattern = delimiter.encode() * (n_columns - 1) + b"\n"
    skip = max(skip_lines, 1)  # the header is checked apart
    with open(path, "rb") as fh:
        rest = b""
        while True:
            block = fh.read(_CLEAN_CHUNK)
            data = rest + block
            if not block:
                if not data:
                    return lines
                if not data.endswith(b"\n"):
                    data += b"\n"
                rest = b""
            else:
                cut = data.rfind(b"\n") + 1
                data, rest = data[:cut], data[cut:]
                if not data:
                    continue
            if skip:  # lines already ingested (an appended file) and the header: step over them without copying
                n = data.count(b"\n")
                if n <= skip:
                    skip -= n
                    data = b""
                else:
                    pos = 0
                    for _ in range(skip):
                        pos = data.find(b"\n", pos) + 1
                    data, skip = data[pos:], 0
                if skip and not block:
                    return lines
            if data:
                if b'"' in data:
                    return None
                if not data.isascii():
                    if b"\xef\xbf\xbd" in data:
                        return None
                    try:
                        data.decode("utf-8")
                    except UnicodeDecodeError:
                        return None
                if exact:
                    # the delimiters and newlines, in order: (n_columns - 1) delimiters then a newline, repeated
                    marks = data.translate(None, drop)
                    if len(marks) % n_columns or marks != pattern * (len(marks) // n_columns):
                        return None
                    lines += len(marks) // n_columns
                else:  # numpy compares 5x faster than bytes.count, and without the GIL
                    arr = np.frombuffer(data, np.uint8)
                    n = int(np.count_nonzero(arr == 10))
                    if int(np.count_nonzero(arr == sep)) != (n_columns - 1) * n:
                        return None
                    lines += n
            if not block:
                return lines


def count_lines(path: Path) -> int:
    """Physical lines of a text file, read in chunks (polars' own count maps the whole file into memory)."""
    n = 0
    last = b"\n"
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


# --- frames --------------------------------------------------------------------------------------------


def _csv_scan(path: Path, src: SourceConfig, names: list[str], skip_rows: int, lossy: bool,
              floats: tuple[str, ...] = (), ragged_ok: bool = True) -> pl.LazyFrame:
    """The lazy CSV scan (every column text, but ``floats`` parsed as Float64 by the reader: a field that is
    neither empty nor a number then fails the whole scan); ``lossy``: bytes that are not UTF-8 become U+FFFD
    (decoding that way costs ~10% of the read, so only where a line needs it or lines are skipped unchecked);
    ``ragged_ok=False``: a line with too many fields fails the scan (short lines are padded with nulls)."""
    return pl.scan_csv(
        path, infer_schema=False, schema_overrides=dict.fromkeys(floats, pl.Float64), separator=src.delimiter,
        encoding="utf8-lossy" if lossy else "utf8", truncate_ragged_lines=ragged_ok,
        skip_rows_after_header=skip_rows, row_index_name="_row", row_index_offset=skip_rows,
        with_column_names=lambda cols: [c.lstrip("\ufeff").strip() for c in cols], raise_if_empty=False,
    ).with_columns((pl.col("_row").cast(pl.Int64) + 2).alias("_line"))


def _parquet_frame(path: Path) -> tuple[pl.LazyFrame, dict[str, pl.DataType], list[str]]:
    try:
        lf = pl.scan_parquet(path)
        schema = dict(lf.collect_schema())
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ValueError(f"{path}: not a readable parquet file ({_first_line(exc)})") from None
    lf = lf.with_row_index("_row").with_columns((pl.col("_row").cast(pl.Int64) + 1).alias("_line"))
    return lf, schema, list(schema)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _check_columns(path: Path, src: SourceConfig, etype: EquipmentType, names: list[str],
                   schema: dict[str, pl.DataType]) -> tuple[list[str], list[str], list[str]]:
    """Schema drift: returns (sensors present, optional sensors missing, unknown columns)."""
    where = f"{path}, line 1" if src.format == "csv" else f"{path}"
    for col in (src.timestamp_column,) + ((src.tag_column, src.value_column) if src.layout == "long" else ()):
        if col not in names:
            raise ValueError(f"{where}: no column {col!r} (got {', '.join(map(repr, names))})")
    for col in (src.equipment_id_column, src.quality_column if src.layout == "long" else None):
        if col and col not in names:
            raise ValueError(f"{where}: no column {col!r} (got {', '.join(map(repr, names))})")
    ts_dtype = schema[src.timestamp_column]
    if not (ts_dtype == pl.String or isinstance(ts_dtype, pl.Datetime | pl.Date)):
        raise ValueError(f"{where}: column {src.timestamp_column!r}: expected text or datetimes, got {ts_dtype}")
    if src.layout == "long":
        known = {src.timestamp_column, src.tag_column, src.value_column, src.quality_column, src.equipment_id_column}
        return [], [], [n for n in names if n not in known]
    present = [s.name for s in etype.sensors if s.name in names]
    missing_required = [s.name for s in etype.sensors if s.required and s.name not in names]
    if missing_required:
        raise ValueError(f"{where}: required sensor {missing_required[0]!r} of equipment type {etype.name!r} "
                         f"is missing (columns: {', '.join(map(repr, names))})")
    missing_optional = [s.name for s in etype.sensors if not s.required and s.name not in names]
    used = {src.timestamp_column, src.equipment_id_column, *present}
    if src.quality_suffix:
        used |= {f"{s}{src.quality_suffix}" for s in present if f"{s}{src.quality_suffix}" in names}
    return present, missing_optional, [n for n in names if n not in used]


def _row_reason(bad: pl.DataFrame | None, src: SourceConfig) -> Any:
    """The first applicable row reason (blank, ragged, bad bytes, timestamp and DST problems)."""
    reason = pl.when(pl.lit(False)).then(pl.lit(None, RowReason))
    if bad is not None and bad.height:
        for kind in ("blank", "ragged_line", "invalid_utf8"):
            lines = bad.filter(pl.col("kind") == kind)["line"]
            if lines.len():
                reason = reason.when(pl.col("_line").is_in(lines.implode())).then(pl.lit(kind, RowReason))
    reason = (
        reason.when(pl.col(src.timestamp_column).is_null()).then(pl.lit("missing_timestamp", RowReason))
        .when(pl.col("_parsed").is_null()).then(pl.lit("bad_timestamp", RowReason))
        .when(pl.col("_nonexist")).then(pl.lit("dst_nonexistent", RowReason))
    )
    if src.ambiguous == "quarantine":
        reason = reason.when(pl.col("_amb")).then(pl.lit("dst_ambiguous", RowReason))
    return reason


PERIOD_US = 32 * 86_400_000_000


def period_number(ts: pl.Expr) -> pl.Expr:
    """32-day periods since 1970 (UTC): the unit of work of stage B (any time bucket would do; this one is a
    single integer division, a twentieth of the cost of calendar months)."""
    return (ts.cast(pl.Int64) // PERIOD_US).cast(pl.Int32).alias("_period")


def _equipment_expr(src: SourceConfig) -> pl.Expr | None:
    if src.equipment_id is not None:
        return pl.lit(src.equipment_id, pl.String)
    if src.equipment_id_column is not None:  # an empty id is rejected by the row reason (_missing_equipment)
        return pl.col(src.equipment_id_column).cast(pl.String).str.strip_chars()
    return None


def _missing_equipment() -> pl.Expr:
    return pl.col("_eq").is_null() | (pl.col("_eq") == "")


def build_staged(lf: pl.LazyFrame, schema: dict[str, pl.DataType], names: list[str], src: SourceConfig,
                 etype: EquipmentType, index: int, bad: pl.DataFrame | None, table: HourTable | None = None
                 ) -> tuple[pl.LazyFrame, list[str]]:
    """The stage A expressions over a scanned file. Returns (staged frame, sensors present in wide); with an hour
    ``table``, a row the table could not convert keeps a null time (see `_stage`).

    Work is laid out as successive with_columns steps over named intermediate columns (prefixed ``_``),
    so that every parse runs once per value even where its result is used several times.
    """
    ts_stages = timestamp_stages(src.timestamp_column, src, schema[src.timestamp_column], table)
    equipment = _equipment_expr(src)
    reason = _row_reason(bad, src)
    present: list[str] = []
    pre: list[pl.Expr] = []
    parts: list[list[list[pl.Expr]]] = []
    final: list[pl.Expr] = []
    if src.layout == "wide":
        present = [s.name for s in etype.sensors if s.name in names]
        pre.append(equipment.alias("_eq"))
        reason = reason.when(_missing_equipment()).then(pl.lit("missing_equipment_id", RowReason))
        for s in etype.sensors:
            if s.name not in present:
                final += [pl.lit(None, pl.Float64).alias(s.name), pl.lit(CODE["ok"], pl.UInt8).alias(f"{s.name}__why")]
                continue
            qname = f"{s.name}{src.quality_suffix}" if src.quality_suffix else None
            parts.append(value_stages(s.name, f"_v_{s.name}", src, schema[s.name], sensor=s,
                                      quality=qname if qname in names else None))
            final += [pl.col(f"_v_{s.name}").alias(s.name), pl.col(f"_v_{s.name}__why").alias(f"{s.name}__why")]
    else:
        # Tags are "<equipment>.<sensor>" (or just "<sensor>" when the equipment comes from a column): the
        # sensor is the text after the last dot, matched against the type's sensors through an Enum cast.
        tag = pl.col(src.tag_column).cast(pl.String)
        names = etype.sensor_names
        pre.append(tag.str.split(".").list.last().cast(pl.Enum(names), strict=False).alias("_sn"))
        has_prefix = pl.lit(True)
        if equipment is None:  # the equipment id is the tag up to ".<sensor>"
            suffix = pl.lit(pl.Series([len(n) + 1 for n in names], dtype=pl.Int64)).gather(
                pl.col("_sn").to_physical())
            parts.append([[], [tag.str.head(-suffix).alias("_eqh")]])
            equipment = pl.when(pl.col("_eqh") == "").then(None).otherwise(pl.col("_eqh"))
            has_prefix = pl.when(pl.col("_sn").is_null()).then(tag).str.contains(".", literal=True)
        parts.append([[], [], [equipment.alias("_eq")]])
        reason = (
            reason.when(tag.is_null()).then(pl.lit("bad_tag", RowReason))
            .when(pl.col("_sn").is_null() & has_prefix).then(pl.lit("unknown_sensor", RowReason))
            .when(pl.col("_sn").is_null()).then(pl.lit("bad_tag", RowReason))
            .when(_missing_equipment()).then(pl.lit("missing_equipment_id", RowReason))
        )
        parts.append([[], *value_stages(src.value_column, "_val", src, schema[src.value_column],
                                        quality=src.quality_column, row_sensor=("_sn", etype.sensors))])
        final += [
            pl.col("_sn").alias("sensor"), pl.col("_val").alias("value"), pl.col("_val__why").alias("value__why"),
            pl.when(pl.col("_sn").is_null()).then(tag).otherwise(None).alias("_tag"),
        ]
    stages = merge_stages([pre], ts_stages, *parts)
    for step in stages:
        lf = lf.with_columns(step)
    lf = lf.with_columns(reason.otherwise(None).alias("_reason"))
    # The equipment id is the partition key (not repeated per row); ts_l is kept only where it differs.
    staged = lf.select(
        pl.lit(index, pl.Int32).alias("_file"), pl.col("_line"), pl.col("ts_e"),
        pl.when(pl.col("_amb")).then(pl.col("ts_l")).alias("ts_l"), pl.col("_amb"), *final, pl.col("_reason"),
        pl.when(pl.col("_reason").is_null()).then(pl.col("_eq")).otherwise(pl.lit(REJECTED)).alias("_part"),
        pl.when(pl.col("_reason").is_null()).then(period_number(pl.col("ts_e"))).otherwise(0).alias("_period"),
    )
    return staged, present


def stage_file(path: Path, index: int, src: SourceConfig, etype: EquipmentType, out_dir: Path,
               skip_rows: int = 0) -> StagedFile:
    """Read, clean and stage one file; raise ValueError naming file/line/column for unusable input.

    CSV: the bytes-level line check (Python, ~2 s a GB) runs in a thread while polars stages the file as if
    every line were well formed, the usual case. When the check finds a line that is not (or the optimistic
    pass fails), the file is staged again, with its bad lines known. Local times are converted by a table of
    the zone's hours around the first and last line's times where there is one (a time it misses: the pass runs
    again with the exact, slower conversion)."""
    if src.format != "csv":
        lf, schema, names = _parquet_frame(path)
        ends = (lf.select(pl.col(src.timestamp_column).first().alias("a"), pl.col(src.timestamp_column).last())
                .collect().row(0) if src.timestamp_column in schema else None)
        table = _hour_table(src, schema.get(src.timestamp_column), ends)
        return _stage(StagedFile(index, path, out_dir), lf, schema, names, src, etype, None, None, skip_rows,
                      table=table)
    names = read_csv_header(path, src)
    schema = {n: pl.String for n in names}
    floats = _float_columns(names, src, etype)
    skip_lines = 1 + skip_rows if skip_rows else 0
    table = _hour_table(src, pl.String, _csv_ends(path, src, names))
    with ThreadPoolExecutor(1) as pool:
        check = pool.submit(_clean_data_lines, path, src.delimiter, len(names), skip_lines, exact=False)
        try:
            lf = _csv_scan(path, src, names, skip_rows, lossy=skip_rows > 0, floats=floats, ragged_ok=False)
            info = _stage(StagedFile(index, path, out_dir), lf, {**schema, **dict.fromkeys(floats, pl.Float64)},
                          names, src, etype, NO_BAD_LINES, None, skip_rows, optimistic=True, table=table)
        except (ValueError, _OptimisticPassFailed):
            info = None
        counted = check.result()
    # the pass read no line with too many fields (it would have failed) and the delimiters add up: none has too few
    if info is not None and counted is not None and info.lines_read - skip_rows == counted:
        return info
    shutil.rmtree(out_dir, ignore_errors=True)
    clean = None if counted is None else _clean_data_lines(path, src.delimiter, len(names), skip_lines)
    bad, n_lines = scan_bad_lines(path, src, len(names), skip_lines) if clean is None else (NO_BAD_LINES, clean)
    lf = _csv_scan(path, src, names, skip_rows, lossy=skip_rows > 0 or (bad["kind"] == "invalid_utf8").any())
    return _stage(StagedFile(index, path, out_dir), lf, schema, names, src, etype, bad, n_lines, skip_rows,
                  table=table)


TABLE_MARGIN_HOURS = 40 * 24  # the table covers the first and last line's times and this much around them


def _csv_ends(path: Path, src: SourceConfig, names: list[str]) -> tuple[str, str] | None:
    """The timestamp texts of the first and the last data line (None where a line does not split)."""
    col = names.index(src.timestamp_column)
    texts = []
    with open(path, "rb") as fh:
        fh.readline(1 << 20)  # the header
        first = fh.readline(1 << 20)
        fh.seek(max(fh.seek(0, 2) - (64 << 10), 0))
        tail = fh.read().splitlines()
    for line in (first, *[ln for ln in tail[::-1] if ln.strip()][:1]):
        try:
            fields = next(csv.reader([line.decode("utf-8")], delimiter=src.delimiter))
        except (UnicodeDecodeError, StopIteration, csv.Error):
            return None
        if col >= len(fields):
            return None
        texts.append(fields[col].strip())
    return (texts[0], texts[-1]) if texts else None


def _hour_table(src: SourceConfig, dtype: pl.DataType | None, ends: tuple | None) -> HourTable | None:
    """The hours of the source's zone around the times of the file's first and last rows (``ends``: texts or naive
    datetimes; a log is mostly in time order, a time outside costs one more pass), or None where the exact
    conversion runs anyway: times in UTC or with their own offset, a table too long, ends that do not parse."""
    fmt = src.timestamp_format
    if ends is None or src.timezone == "UTC" or isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
        return None
    if dtype == pl.String:
        if fmt is None or has_offset(fmt):
            return None
        t = pl.Series(ends, dtype=pl.String).str.to_datetime(fmt, strict=False, time_unit="us", cache=False)
    elif isinstance(dtype, pl.Datetime | pl.Date):
        t = pl.Series(ends, dtype=dtype).cast(pl.Datetime("us"))
    else:
        return None
    return HourTable.around(src.timezone, t, TABLE_MARGIN_HOURS)


class _OptimisticPassFailed(Exception):
    """The optimistic pass over a CSV file failed to read it (a text value in a column read as numbers, a line
    with too many fields): the file is staged again on the exact path."""


def _float_columns(names: list[str], src: SourceConfig, etype: EquipmentType) -> tuple[str, ...]:
    """The value columns that the optimistic pass lets the CSV reader parse as Float64 (wide: the sensors
    present; long: the value column). The reader's numbers are the text path's for every field it accepts
    (empty fields are null in both; tests/test_ingest_fastpath.py compares the two) and it fails on any other
    field, so a file with state words or other text in them goes the exact, slower way: parsing every value
    as text first costs ~20% of stage A."""
    if src.decimal_comma:
        return ()
    if src.layout == "long":
        return (src.value_column,)
    return tuple(s.name for s in etype.sensors if s.name in names)


def _stage(info: StagedFile, lf: pl.LazyFrame, schema: dict[str, pl.DataType], names: list[str], src: SourceConfig,
           etype: EquipmentType, bad: pl.DataFrame | None, n_lines: int | None, skip_rows: int,
           optimistic: bool = False, table: HourTable | None = None) -> StagedFile:
    """Stage A proper: checks of the columns, the cleaning expressions, the partitioned sink and the summary.
    ``optimistic``: a read error raises _OptimisticPassFailed at once (the caller stages the file again).
    ``table``: local times converted by that hour table; when it missed one, the file is sunk again with the exact
    conversion."""
    path = info.path
    present, info.missing_sensors, info.unknown_columns = _check_columns(path, src, etype, names, schema)
    for col in (src.value_column,) if src.layout == "long" else present:
        dt = schema[col]
        if not (dt == pl.String or dt.is_numeric() or dt == pl.Boolean):
            raise ValueError(f"{path}: column {col!r}: expected numbers or text, got {dt}")
    staged, _ = build_staged(lf, schema, names, src, etype, info.index, bad, table)
    info.dir.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PartitionBy is marked unstable
            # staging is temporary: uncompressed Arrow IPC (cheaper to write than parquet, read back mapped), rows
            # in any order (stage B sorts them by time, file and line)
            staged.sink_ipc(pl.PartitionBy(info.dir, key=["_part"], include_key=False), mkdir=True,
                            compression="uncompressed", maintain_order=False)
    except pl.exceptions.PolarsError as exc:
        if optimistic:
            raise _OptimisticPassFailed(_first_line(exc)) from None
        if src.format == "csv":
            line = _first_unbalanced_quote(path)
            if line is not None:
                raise ValueError(f"{path}, line {line}: unbalanced quote character; expected every quoted field "
                                 f"to close on its line") from None
        raise ValueError(f"{path}: could not be read as {src.format} ({_first_line(exc)})") from None
    rejected, usable = _staged_files(info.dir)
    if table is not None and usable and pl.scan_ipc(usable).select(pl.col("ts_e").is_null().any()).collect().item():
        # a usable row without a time: its local time was not in the table; staged again, converted the exact way
        shutil.rmtree(info.dir)
        return _stage(StagedFile(info.index, path, info.dir), lf, schema, names, src, etype, bad, n_lines, skip_rows,
                      optimistic)
    # the counts for the report and the file-level checks (columns the reader parsed as numbers hold no text)
    texts = [c for c in present if schema[c] == pl.String]
    _summarise(info, src, texts, bad, n_lines, skip_rows, *_staged_summary(rejected, usable, src, texts))
    return info


def _staged_files(out_dir: Path) -> tuple[list[str], list[str]]:
    """The staged files of rejected rows and of usable rows."""
    rejected, usable = [], []
    for eq, d in _partitions(out_dir).items():
        (rejected if eq == REJECTED else usable).extend(str(f) for f in sorted(d.glob(STAGED)))
    return rejected, usable


def _staged_summary(rejected: list[str], usable: list[str], src: SourceConfig, texts: list[str]
                    ) -> list[pl.DataFrame]:
    """What _summarise needs, read back from the staged files (only the columns it needs; usable rows are counted
    from the files' metadata): rows and first line per row reason (null: usable rows); per sensor read as text
    (``texts``), the values that are text and the values that are not empty; long layout: the unknown tags.
    Computed beside the sink in the same pass instead, polars holds the staged rows in memory for the slower
    of the two (5.5 GB for the 5.7 GB long benchmark file)."""
    by_reason = pl.DataFrame(schema={"_reason": RowReason, "len": pl.UInt32, "first": pl.Int64})
    if rejected:
        by_reason = pl.scan_ipc(rejected).group_by("_reason").agg(
            pl.len(), pl.col("_line").min().alias("first")).collect()
    n_usable = pl.scan_ipc(usable).select(pl.len()).collect().item() if usable else 0
    if n_usable:
        by_reason = pl.concat([by_reason, pl.DataFrame({"_reason": [None], "len": [n_usable], "first": [None]},
                                                       schema=by_reason.schema)])
    good = pl.scan_ipc(usable) if usable else None
    if src.layout == "wide":
        whys = [f"{s}__why" for s in texts]
        if not whys or good is None:
            return [by_reason, pl.DataFrame()]
        stats = good.select(
            *[(pl.col(w) == CODE["not_numeric"]).sum().alias(f"{w}:nn") for w in whys],
            *[(pl.col(w) != CODE["empty"]).sum().alias(f"{w}:ne") for w in whys],
            *[pl.col("_line").filter(pl.col(w) == CODE["not_numeric"]).min().alias(f"{w}:first") for w in whys],
        ).collect()
        return [by_reason, stats]
    stats = pl.DataFrame(schema={"sensor": pl.String, "nn": pl.UInt32, "ne": pl.UInt32, "first": pl.Int64})
    if good is not None:
        stats = good.group_by("sensor").agg(
            (pl.col("value__why") == CODE["not_numeric"]).sum().alias("nn"),
            (pl.col("value__why") != CODE["empty"]).sum().alias("ne"),
            pl.col("_line").filter(pl.col("value__why") == CODE["not_numeric"]).min().alias("first"),
        ).collect()
    tags = (pl.scan_ipc(rejected).select(pl.col("_tag").drop_nulls().unique()).collect() if rejected
            else pl.DataFrame(schema={"_tag": pl.String}))
    return [by_reason, stats, tags]


def _summarise(info: StagedFile, src: SourceConfig, texts: list[str], bad: pl.DataFrame | None,
               n_lines: int | None, skip_rows: int, by_reason: pl.DataFrame, stats: pl.DataFrame,
               tags: pl.DataFrame | None = None) -> None:
    """Counts for the report, and the file-level checks that turn into errors (from _staged_summary)."""
    total = int(by_reason["len"].sum())
    if not total:
        info.lines_read = skip_rows
        return
    counts = {str(r): int(n) for r, n in zip(by_reason["_reason"], by_reason["len"]) if r is not None}
    first = {str(r): int(f) for r, f in zip(by_reason["_reason"], by_reason["first"]) if r is not None}
    info.blank = counts.pop("blank", 0)
    info.rows = total - info.blank
    info.rejected = counts
    info.lines_read = skip_rows + total
    where = info.path
    if n_lines is not None and total != n_lines:
        raise ValueError(f"{where}: {n_lines} lines but {total} CSV records: a quoted field spans several "
                         f"lines or quotes are unbalanced (expected one record per line)")
    ragged = bad.filter(pl.col("kind") == "ragged_line") if bad is not None else None
    if ragged is not None and info.rows >= 2 and ragged.height == info.rows and ragged["fields"].n_unique() == 1:
        r = ragged.row(0, named=True)
        raise ValueError(f"{where}, line {r['line']}: every data line has the same wrong number of fields (line "
                         f"{r['line']} has {r['fields']}, the header has {len(read_csv_header(info.path, src))}; "
                         f"trailing delimiters or a wrong delimiter?)")
    usable_ts = info.rows - sum(counts.get(k, 0) for k in ("ragged_line", "invalid_utf8", "missing_timestamp"))
    if usable_ts >= 2 and counts.get("bad_timestamp", 0) == usable_ts:
        line = first["bad_timestamp"]
        raise ValueError(f"{where}, line {line}, column {src.timestamp_column!r}: no timestamp matches the "
                         f"format {src.timestamp_format!r} (expected e.g. {_example_ts(src)}, got "
                         f"{_value_at(info.path, line, src)!r})")
    if info.rows == sum(counts.values()):  # no usable row
        return
    if src.layout == "wide":
        whys = [f"{s}__why" for s in texts]
        if not whys:
            return
        stats = stats.row(0, named=True)
        for s, w in zip(texts, whys):
            nn, ne, line = stats[f"{w}:nn"], stats[f"{w}:ne"], stats[f"{w}:first"]
            if nn:
                info.not_numeric[s] = line
            if nn >= 2 and nn == ne:
                raise ValueError(f"{where}, line {line}, column {s!r}: expected numbers, got "
                                 f"{_value_at(info.path, line, src, s)!r} (every value in the column is text: "
                                 f"wrong delimiter or decimal_comma?)")
    else:
        info.sensors_seen = {str(s) for s in stats["sensor"]}
        for row in stats.iter_rows(named=True):
            if row["nn"]:
                info.not_numeric[str(row["sensor"])] = row["first"]
        nn, ne = int(stats["nn"].sum()), int(stats["ne"].sum())
        if nn >= 2 and nn == ne:
            line = int(stats["first"].min())
            raise ValueError(f"{where}, line {line}, column {src.value_column!r}: expected numbers, got "
                             f"{_value_at(info.path, line, src, src.value_column)!r} (every value is text)")
    if tags is not None:
        info.unknown_tags = sorted(tags["_tag"].to_list())[:50]


def _first_unbalanced_quote(path: Path) -> int | None:
    """The first line with an odd number of double quotes (for a clear parse error), or None."""
    odd = (
        _raw_lines(path, 0).filter((pl.col("line").str.count_matches('"', literal=True) % 2) == 1)
        .select((pl.col("_i").cast(pl.Int64) + 1).alias("line")).head(1).collect()
    )
    return int(odd.item()) if odd.height else None


def _example_ts(src: SourceConfig) -> str:
    from datetime import datetime

    try:
        return repr(datetime(2024, 1, 31, 13, 45, 0).strftime(src.timestamp_format or ""))
    except ValueError:
        return repr(src.timestamp_format)


def _value_at(path: Path, line: int, src: SourceConfig, column: str | None = None) -> str:
    """The text of one field (or the whole line) of a CSV line, or of a parquet row, for messages."""
    column = column or src.timestamp_column
    if src.format == "parquet":
        row = pl.scan_parquet(path).select(pl.col(column).cast(pl.String)).slice(line - 1, 1).collect()
        return row.item() if row.height else ""
    text = fetch_lines(path, [line]).get(line, "")
    try:
        header = read_csv_header(path, src)
        fields = next(csv.reader([text], delimiter=src.delimiter))
        return fields[header.index(column)] if column in header and header.index(column) < len(fields) else text
    except (ValueError, StopIteration):
        return text


def fetch_lines(path: Path, lines: list[int]) -> dict[int, str]:
    """The raw text of the given 1-based lines of a text file (one streaming pass)."""
    if not lines:
        return {}
    wanted = pl.Series(sorted(set(lines)), dtype=pl.Int64)
    df = (
        _raw_lines(path, 0)
        .select((pl.col("_i").cast(pl.Int64) + 1).alias("line"), pl.col("line").alias("text"))
        .filter(pl.col("line").is_in(wanted.implode()))
        .collect()
    )
    return {int(n): (t or "").rstrip("\r") for n, t in zip(df["line"], df["text"])}


def fetch_parquet_rows(path: Path, rows: list[int]) -> dict[int, str]:
    """The given 1-based rows of a parquet file as JSON text."""
    if not rows:
        return {}
    wanted = pl.Series(sorted(set(rows)), dtype=pl.Int64)
    lf = pl.scan_parquet(path)
    cols = list(lf.collect_schema())
    df = (
        lf.with_row_index("_r")
        .filter((pl.col("_r").cast(pl.Int64) + 1).is_in(wanted.implode()))
        .select((pl.col("_r").cast(pl.Int64) + 1).alias("row"),
                pl.struct([pl.col(c).cast(pl.String) for c in cols]).struct.json_encode().alias("text"))
        .collect()
    )
    return dict(zip(df["row"].to_list(), df["text"].to_list()))
