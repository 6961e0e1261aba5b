"""The ingest's shortcuts. Stage A's optimistic CSV pass (value columns parsed as numbers by the CSV reader, line
shapes proved by delimiter counts) must give exactly what the exact (text) path gives, and fall back to it for
anything else; the batch time zone conversion must equal polars' row by row; stage B skips sorting rows that
are already in order, and must recognise exactly those."""

from __future__ import annotations

import io
import os

import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_ingest import LONG, WIDE, ingest, plant, quarantine, store, wide_csv, write_raw

import pipelines.ingest.readers as readers


def _passes(monkeypatch) -> list[bool]:
    """Records, per stage A pass, whether it was the optimistic one."""
    calls: list[bool] = []
    real = readers._stage

    def spy(*args, optimistic=False, **kw):
        calls.append(optimistic)
        return real(*args, optimistic=optimistic, **kw)

    monkeypatch.setattr(readers, "_stage", spy)
    return calls


def _outcome(result, cfg) -> tuple:
    rep = result.report
    q = quarantine(result)
    rows = store(cfg).drop("equipment_type", "month") if rep.partitions_written else None
    return (rep.rows_in, rep.kept, rep.deduplicated, rep.nulled_by_reason, rep.empty_values,
            sorted(zip(q["line"].to_list(), q["reason"].to_list())), rows)


def test_clean_file_takes_one_optimistic_pass(tmp_path, monkeypatch):
    calls = _passes(monkeypatch)
    cfg = plant(tmp_path)
    write_raw(tmp_path, "a.csv", "timestamp,equipment_id,flow,pressure\n"
              "2024-01-15 10:00:00,P1,1.5,2\n2024-01-15 10:01:00,P1,,2.5\n2024-01-15 10:02:00,P1,1e1,-9999\n")
    r = ingest(cfg)
    assert calls == [True]
    assert (r.report.kept, r.report.nulled_by_reason) == (3, {"sentinel": 1})
    assert r.report.empty_values == 1


@pytest.mark.parametrize("layout", ["wide", "long"])
def test_text_value_falls_back_to_the_exact_path(tmp_path, monkeypatch, layout):
    calls = _passes(monkeypatch)
    if layout == "wide":
        cfg = plant(tmp_path)
        text = ("timestamp,equipment_id,flow,pressure\n2024-01-15 10:00:00,P1,1.5,2\n"
                "2024-01-15 10:01:00,P1,Shutdown,2.5\n2024-01-15 10:02:00,P1,x1,3\n")
    else:
        cfg = plant(tmp_path, [LONG])
        text = ("tag,timestamp,value,quality\nP1.flow,2024-01-15 10:00:00,1.5,Good\n"
                "P1.flow,2024-01-15 10:01:00,Shutdown,Good\nP1.pressure,2024-01-15 10:01:00,x1,Good\n")
    write_raw(tmp_path, "a.csv", text)
    r = ingest(cfg)
    assert calls == [True, False]
    assert r.report.nulled_by_reason == {"state_word": 1, "not_numeric": 1}


def test_short_and_long_line_that_balance_the_delimiter_count(tmp_path, monkeypatch):
    """One line a field short and one a field long: the delimiter total is right, the optimistic read fails on
    the long line, and the exact path quarantines both."""
    calls = _passes(monkeypatch)
    cfg = plant(tmp_path)
    write_raw(tmp_path, "a.csv", "timestamp,equipment_id,flow,pressure\n2024-01-15 10:00:00,P1,1.5,2\n"
              "2024-01-15 10:01:00,P1,2\n2024-01-15 10:02:00,P1,1,2,3\n2024-01-15 10:03:00,P1,1.5,2\n")
    r = ingest(cfg)
    assert calls == [True, False]
    assert (r.report.rows_in, r.report.kept) == (4, 2)
    assert sorted(zip(quarantine(r)["line"], quarantine(r)["reason"])) == [(3, "ragged_line"), (4, "ragged_line")]


_cell = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**6, 10**6).map(str),
    st.sampled_from(["", " 1.5", "1.5 ", "+1", ".5", "5.", "1e3", "1E-3", "1e", "inf", "-Infinity", "NaN", "nan",
                     "-9999", "1e400", "00012", "1.2.3", "--1", "0x10", "1_000", "Shutdown", "bad", "x1", " "]),
    st.text(alphabet="0123456789.eE+-naif ", max_size=6),
)


@given(st.lists(st.tuples(_cell, _cell), min_size=1, max_size=12))
@settings(max_examples=int(os.environ.get("RMAMBA_FASTPATH_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_optimistic_and_exact_paths_agree(tmp_path_factory, values):
    """Whatever the value fields hold, the ingest gives the same report, quarantine and store with the
    optimistic pass as with the exact text path alone."""
    outcomes = []
    for optimistic in (True, False):
        root = tmp_path_factory.mktemp("fast")
        cfg = plant(root, max_ffill=0)
        lines = ["timestamp,equipment_id,flow,pressure"]
        lines += [f"2024-01-15 10:{i:02d}:00,P1,{a},{b}" for i, (a, b) in enumerate(values)]
        write_raw(root, "a.csv", "\n".join(lines) + "\n")
        saved = readers._float_columns
        if not optimistic:
            readers._float_columns = lambda *a: ()
        try:
            outcomes.append(_outcome(ingest(cfg), cfg))
        except ValueError as exc:  # e.g. every value of a column is text: the same error either way
            outcomes.append((str(exc).replace(str(root), "<root>"),) * 7)
        finally:
            readers._float_columns = saved
    fast, exact = outcomes
    assert fast[:6] == exact[:6]
    assert fast[6] is exact[6] or isinstance(fast[6], str) or fast[6].equals(exact[6])


def test_wide_float_columns_are_the_sensors_present(tmp_path):
    cfg = plant(tmp_path)
    src, etype = cfg.sources[0], cfg.equipment_types["pump"]
    assert readers._float_columns(["timestamp", "equipment_id", "flow", "pressure", "x"], src, etype) == (
        "flow", "pressure")
    cfg2 = plant(tmp_path / "b", [{**WIDE, "decimal_comma": True}])
    assert readers._float_columns(["timestamp", "flow"], cfg2.sources[0], etype) == ()


_ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Sao_Paulo", "Asia/Kolkata", "UTC"]
# days with a clock change in one of the zones (Lord Howe moves by 30 minutes; Sao Paulo changed at midnight)
_CHANGE_DAYS = ["2024-03-31", "2024-10-27", "2024-03-10", "2024-11-03", "2024-04-07", "2024-10-06", "2018-11-04",
                "2019-02-17", "1996-10-27"]


@given(st.sampled_from(_ZONES), st.sampled_from(_CHANGE_DAYS),
       st.lists(st.one_of(st.none(), st.integers(-2 * 3_600_000_000, 4 * 3_600_000_000)), max_size=60),
       st.lists(st.integers(-(10**15), 4 * 10**15), max_size=5))
@settings(max_examples=200, deadline=None)
def test_local_to_utc_matches_polars(tz, day, near, far):
    """The batch conversion (offset per hour, looked up by position or, for a batch spread over many years, by
    hash) equals polars' row-by-row conversion; most local times fall between 22:00 and 04:00 around a clock
    change (they happen at 00:00 to 03:00 local in these zones)."""
    from datetime import datetime

    from pipelines.ingest.quality import _polars_local_to_utc, local_to_utc

    start = int((datetime.fromisoformat(day) - datetime(1970, 1, 1)).total_seconds() * 1e6)  # local midnight
    values = [None if v is None else start + v for v in near] + far
    local = pl.Series("t", values, dtype=pl.Int64).cast(pl.Datetime("us"))
    got = local_to_utc(tz)(local).struct.unnest()
    want = _polars_local_to_utc(local, tz)
    assert got.equals(want.select(got.columns))


@given(st.sampled_from(_ZONES), st.sampled_from(_CHANGE_DAYS),
       st.lists(st.tuples(st.integers(-3000, 3000), st.integers(0, 400),
                          st.lists(st.one_of(st.none(), st.integers(-2 * 3_600_000_000, 4 * 3_600_000_000)),
                                   max_size=20)), min_size=1, max_size=5))
@settings(max_examples=150, deadline=None)
def test_local_to_utc_batches_share_a_table(tz, day, batches):
    """One converter over several batches (as the streaming engine calls it): the hourly offset table they share
    grows, is reused or replaced, and every batch still equals polars' row-by-row conversion. Batches are shifted
    by whole days around the clock change (their tables overlap or not) and spread over up to 400 extra hours."""
    from datetime import datetime

    from pipelines.ingest.quality import _polars_local_to_utc, local_to_utc

    start = int((datetime.fromisoformat(day) - datetime(1970, 1, 1)).total_seconds() * 1e6)
    convert = local_to_utc(tz)
    for shift_days, spread_hours, near in batches:
        base = start + shift_days * 86_400_000_000
        values = [None if v is None else base + v for v in near] + [base + spread_hours * 3_600_000_000]
        local = pl.Series("t", values, dtype=pl.Int64).cast(pl.Datetime("us"))
        got = convert(local).struct.unnest()
        assert got.equals(_polars_local_to_utc(local, tz).select(got.columns))


_ZONE_CHANGES = [("Europe/Berlin", "2024-03-31"), ("Europe/Berlin", "2024-10-27"), ("Europe/Berlin", "1996-10-27"),
                 ("America/New_York", "2024-03-10"), ("America/New_York", "2024-11-03"),
                 ("Australia/Lord_Howe", "2024-04-07"), ("Australia/Lord_Howe", "2024-10-06"),
                 ("America/Sao_Paulo", "2018-11-04"), ("America/Sao_Paulo", "2019-02-17"),
                 ("Asia/Kolkata", "2024-03-31"), ("UTC", "2024-10-27")]


@given(st.sampled_from(_ZONE_CHANGES), st.integers(-48, 720), st.integers(0, 1500),
       st.lists(st.one_of(st.none(), st.integers(-2 * 3_600_000_000, 4 * 3_600_000_000)), max_size=60),
       st.lists(st.integers(-(10**15), 4 * 10**15), max_size=3))
@example(("Australia/Lord_Howe", "2024-10-06"), 10, 100, [int(2.75 * 3_600_000_000)], [])  # 02:00-02:30 skipped
@example(("Australia/Lord_Howe", "2024-04-07"), 10, 100, [int(1.75 * 3_600_000_000)], [])  # 01:30-02:00 twice
@example(("Europe/Berlin", "2024-10-27"), 10, 100, [int(2.5 * 3_600_000_000), None], [])  # 02:00-03:00 twice
@example(("Europe/Berlin", "2024-03-31"), 10, 100, [int(2.5 * 3_600_000_000)], [])  # 02:00-03:00 skipped
@settings(max_examples=300, deadline=None)
def test_hour_table_conversion_matches_polars(zone_day, before, hours, near, far):
    """The table lookup in polars (`table_stages`, used when a file's span of hours is known up front) gives polars'
    row-by-row conversion on every row it converts, and marks (_tzx) exactly the rows outside the table's hours or
    in an hour whose offset changes inside it (Lord Howe's 30-minute change). Local times fall around a clock
    change of the zone; the table starts ``before`` hours before that day and ends ``after`` hours after it, so the
    change is in it or not, and holds ``hours`` + 1 hours."""
    from datetime import datetime

    from pipelines.ingest.quality import HOUR_OTHER, HourTable, _polars_local_to_utc, table_stages

    tz, day = zone_day
    start = int((datetime.fromisoformat(day) - datetime(1970, 1, 1)).total_seconds() * 1e6)  # local midnight
    first = start // 3_600_000_000 - before
    table = HourTable.build(tz, first, first + hours)
    values = [None if v is None else start + v for v in near] + far
    local = pl.Series("t", values, dtype=pl.Int64).cast(pl.Datetime("us"))
    df = pl.DataFrame({"_parsed": local})
    for step in table_stages(table):
        df = df.with_columns(step)
    hour = (local.cast(pl.Int64) // 3_600_000_000 - table.h0).to_list()
    n = len(table.kind)
    other = [h is not None and not (0 <= h < n and table.kind[h] != HOUR_OTHER) for h in hour]
    assert df["_tzx"].to_list() == other
    want = _polars_local_to_utc(local, tz)
    cols = ["ts_e", "ts_l", "_amb", "_nonexist"]
    keep = ~df["_tzx"]
    assert df.filter(keep).select(cols).equals(want.filter(keep).select(cols))


@given(st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 3)), st.integers(0, 1), st.integers(0, 3)),
                max_size=12), st.booleans())
@settings(max_examples=300, deadline=None)
def test_in_order_recognises_sorted_rows(rows, long):
    """align._in_order is true exactly when sorting by (time[, sensor], _file, _line) would change nothing."""
    from pipelines.ingest.align import _in_order

    df = pl.DataFrame({"timestamp": [None if t is None else t * 60_000_000 for t, _, _ in rows],
                       "sensor": [["b", "a"][f] for _, f, _ in rows],
                       "_file": [f for _, f, _ in rows], "_line": [ln for _, _, ln in rows]},
                      schema={"timestamp": pl.Int64, "sensor": pl.String, "_file": pl.Int32, "_line": pl.Int64})
    df = df.with_columns(pl.col("timestamp").cast(pl.Datetime("us", "UTC")), pl.col("sensor").cast(pl.Enum(["b", "a"])))
    key = ["timestamp", "sensor"] if long else ["timestamp"]
    cols = [*key, "_file", "_line"]
    expected = df.select(cols).equals(df.select(cols).sort(cols)) and df["timestamp"].null_count() == 0
    assert _in_order(df, key) == (expected or df.height < 2)


_SENSORS = ["flow", "speed", "temp"]


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40), st.integers(0, 1), st.integers(0, 30),
                          st.one_of(st.none(), st.floats(-1e6, 1e6))), max_size=40),
       st.booleans())
@settings(max_examples=300, deadline=None)
def test_long_observations_match_a_pivot(rows, extra_category):
    """Stage B's long rows -> one row per grid point: sorting by (sensor, time, _file, _line) through `_sorted` and
    the numpy merge in `_long_observations` give what the straightforward way gives (rows sorted by time, then a
    pivot keeping the last reading per grid point and sensor). Times are in 20 s steps, the grid is 1 min, so
    several readings share a grid point; the same line can repeat (ties broken by position, as the sort keeps)."""
    from pipelines.ingest.align import _long_observations, _sorted, bucket_expr

    categories = [*_SENSORS, "other"] if extra_category else _SENSORS  # a category the type does not have
    df = pl.DataFrame({"timestamp": [t * 20_000_000 for _, t, _, _, _ in rows],
                       "sensor": [categories[s] for s, _, _, _, _ in rows],
                       "_file": [f for _, _, f, _, _ in rows], "_line": [ln for _, _, _, ln, _ in rows],
                       "value": [v for *_, v in rows]},
                      schema={"timestamp": pl.Int64, "sensor": pl.String, "_file": pl.Int32, "_line": pl.Int64,
                              "value": pl.Float64})
    df = df.with_columns(pl.col("timestamp").cast(pl.Datetime("us", "UTC")),
                         pl.col("sensor").cast(pl.Enum(categories)))
    key = ["sensor", "timestamp"]
    got_sorted = _sorted(df, key)
    assert got_sorted.equals(df.sort([*key, "_file", "_line"], maintain_order=True))

    bucket = bucket_expr(pl.col("timestamp"), "1m").alias("timestamp")
    usable = got_sorted.filter(pl.col("value").is_not_null()).select(bucket, "sensor", "value")
    got = _long_observations(usable, _SENSORS)

    ref = (df.sort(["timestamp", "sensor", "_file", "_line"], maintain_order=True).filter(pl.col("value").is_not_null())
           .filter(pl.col("sensor").cast(pl.String).is_in(_SENSORS))
           .select(bucket, pl.col("sensor").cast(pl.String), "value"))
    if ref.height:
        ref = ref.pivot(on="sensor", index="timestamp", values="value", aggregate_function="last")
    ref = ref.select("timestamp", *[pl.col(s) if s in ref.columns else pl.lit(None, pl.Float64).alias(s)
                                    for s in _SENSORS]).sort("timestamp")
    assert got.equals(ref), (got, ref)


@pytest.mark.parametrize("tz, outlier", [("Europe/Berlin", False), ("Europe/Berlin", True),
                                         ("Australia/Lord_Howe", False)])
@pytest.mark.parametrize("layout", ["wide", "long", "parquet text", "parquet datetime"])
def test_hour_table_staging_matches_the_exact_conversion(tmp_path, monkeypatch, tz, outlier, layout):
    """Stage A converts local times by an hour table around the first and last row's times when it can; the
    store, quarantine and report equal those of the exact conversion (the table switched off) for logs crossing
    both clock changes of the year (a repeated hour written twice in file order, a skipped one), in a zone whose
    clock moves by 30 minutes (its changing hours are not in the table: staged again, exactly) and with a row
    far outside the first and last row's times (also staged again); CSV (wide, long) and parquet (wide, times as
    text or as naive datetimes)."""
    days = {"Europe/Berlin": ("2024-03-31", "2024-10-27"), "Australia/Lord_Howe": ("2024-04-07", "2024-10-06")}[tz]
    stamps = [f"{day} {h:02d}:{m:02d}:00" for day in days for h in range(0, 5) for m in range(0, 60, 10)]
    stamps += [s for s in stamps if s.startswith(days[1] + " 02:")]  # the repeated hour: its readings again
    if outlier:
        stamps.insert(len(stamps) // 2, "2023-01-05 12:00:00")
    fname = "a.csv"
    if layout == "wide":
        text = wide_csv([(s, "P1", i % 50, 1 + i % 7) for i, s in enumerate(stamps)])
        src = {**WIDE, "timezone": tz, "ambiguous": "infer"}
    elif layout.startswith("parquet"):
        n = len(stamps)
        frame = pl.DataFrame({"timestamp": stamps, "equipment_id": "P1", "flow": [float(i % 50) for i in range(n)],
                              "pressure": [float(1 + i % 7) for i in range(n)]})
        if layout == "parquet datetime":
            frame = frame.with_columns(pl.col("timestamp").str.to_datetime("%Y-%m-%d %H:%M:%S", time_unit="us"))
        buf = io.BytesIO()
        frame.write_parquet(buf)
        text, fname = buf.getvalue(), "a.parquet"
        src = {**WIDE, "path": "raw/*.parquet", "format": "parquet", "timezone": tz, "ambiguous": "infer"}
    else:
        pairs = [(i, s, k, tag) for i, s in enumerate(stamps) for k, tag in ((1, "flow"), (3, "pressure"))]
        text = "tag,timestamp,value,quality\n" + "".join(f"P1.{t},{s},{(i * k) % 50},Good\n" for i, s, k, t in pairs)
        src = {**LONG, "timezone": tz, "ambiguous": "infer"}
    tables = []
    real = readers._stage
    monkeypatch.setattr(readers, "_stage", lambda *a, **k: tables.append(k.get("table") is not None) or real(*a, **k))
    results = {}
    for name in ("table", "exact"):
        if name == "exact":
            monkeypatch.setattr(readers, "_hour_table", lambda *a: None)
        root = tmp_path / name
        cfg = plant(root, [src])
        write_raw(root, fname, text)
        r = ingest(cfg)
        q = quarantine(r).with_columns(pl.col("file").str.split("/").list.last())
        results[name] = (store(cfg), q, r.report.kept, r.report.quarantined, r.report.deduplicated)
    staged_again = tz == "Australia/Lord_Howe" or outlier
    assert tables == ([True, False, False] if staged_again else [True, False])
    table, exact = results["table"], results["exact"]
    assert table[0].height > 0 and table[0].equals(exact[0])
    assert table[1].equals(exact[1]) and table[2:] == exact[2:]
    assert table[3] > 0  # the skipped hour's lines
