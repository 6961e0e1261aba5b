"""Ingest of wide and long logs: time zones and DST, duplicates, quality, limits, alignment, store, report.

The helpers at the top (plant files, ingest with the row invariant checked, store reads) are shared with
test_ingest_malformed.py and test_ingest_incremental.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipelines.config import PlantConfig, load_plant_config
from pipelines.ingest import IngestReport, SourceResult, format_table, ingest_source, scan_store, write_report
from pipelines.ingest import run as run_mod

SENSORS_TOML = """
[equipment_types.pump]
[[equipment_types.pump.sensors]]
name = "flow"
unit = "m3/h"
min = 0.0
max = 400.0
[[equipment_types.pump.sensors]]
name = "pressure"
unit = "bar"
min = 0.0
max = 25.0
[[equipment_types.pump.sensors]]
name = "vibration"
required = false
"""

WIDE = {"path": "raw/*.csv", "timestamp_format": "%Y-%m-%d %H:%M:%S", "timezone": "UTC", "equipment_type": "pump",
        "equipment_id_column": "equipment_id", "grid": "1m", "max_ffill": 2, "sentinels": [-9999.0],
        "stuck_steps": 0}
LONG = {"path": "raw/*.csv", "layout": "long", "timestamp_format": "%Y-%m-%d %H:%M:%S", "timezone": "UTC",
        "equipment_type": "pump", "grid": "1m", "max_ffill": 2, "tag_column": "tag", "value_column": "value",
        "quality_column": "quality", "stuck_steps": 0}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def write_plant(root: Path, sources: list[dict] | None = None, **source) -> Path:
    """Write <root>/plant.toml with the pump type and the given sources (default: one wide CSV source)."""
    sources = sources or [{**WIDE, **source}]
    text = ('[plant]\nname = "test-plant"\nstore = "store"\nquarantine = "quarantine"\nreports = "reports"\n'
            'database_url = "sqlite:///plant.db"\n' + SENSORS_TOML)
    for i, src in enumerate(sources):
        src = {"name": f"s{i}", **src}
        text += "\n[[sources]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in src.items())
    root.mkdir(parents=True, exist_ok=True)
    (root / "plant.toml").write_text(text, encoding="utf-8")
    return root / "plant.toml"


def plant(root: Path, sources: list[dict] | None = None, **source) -> PlantConfig:
    return load_plant_config(write_plant(root, sources, **source))


def write_raw(root: Path, name: str, text: str | bytes) -> Path:
    path = root / "raw" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def ingest(cfg: PlantConfig, watermark=None, source: int = 0, **kw) -> SourceResult:
    """ingest_source with the row invariant checked on every call."""
    result = ingest_source(cfg, cfg.sources[source], watermark, **kw)
    r = result.report
    r.check()
    assert r.rows_in == r.kept + r.deduplicated + r.quarantined
    if r.quarantine_file:
        assert pl.read_parquet(r.quarantine_file).height == r.quarantined
    return result


def store(cfg: PlantConfig, equipment: str | None = None) -> pl.DataFrame:
    return scan_store(cfg.store, equipment=equipment).collect().sort("equipment", "timestamp")


def quarantine(result: SourceResult) -> pl.DataFrame:
    if not result.report.quarantine_file:
        return pl.DataFrame(schema={"line": pl.Int64, "reason": pl.String})
    return pl.read_parquet(result.report.quarantine_file).sort("file", "line")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def wide_csv(rows: list[tuple], header: str = "timestamp,equipment_id,flow,pressure") -> str:
    return header + "\n" + "".join(",".join(str(x) for x in r) + "\n" for r in rows)


# --- wide layout -----------------------------------------------------------------------------------------


def test_wide_aligns_to_grid_with_bounded_ffill_and_mask(tmp_path):
    cfg = plant(tmp_path)
    write_raw(tmp_path, "a.csv", wide_csv([
        ("2024-01-15 10:00:00", "P1", 10, 2.0),
        ("2024-01-15 10:01:00", "P1", 11, ""),       # pressure empty: filled from 10:00, masked
        ("2024-01-15 10:02:00", "P2", 50, 3.0),
        ("2024-01-15 10:06:00", "P1", 12, 2.5),      # 3 grid points without P1 readings
    ]))
    r = ingest(cfg)
    assert (r.report.rows_in, r.report.kept, r.report.quarantined) == (4, 4, 0)
    p1 = store(cfg, "P1")
    assert p1["timestamp"].to_list() == [utc(2024, 1, 15, 10, m) for m in range(7)]
    assert p1["flow"].to_list() == [10, 11, 11, 11, None, None, 12]          # max_ffill = 2
    assert p1["flow__missing"].to_list() == [False, False, True, True, True, True, False]
    assert p1["pressure"].to_list() == [2.0, 2.0, 2.0, None, None, None, 2.5]
    assert p1["pressure__missing"].to_list() == [False, True, True, True, True, True, False]
    assert p1["vibration"].null_count() == 7 and p1["vibration__missing"].all()  # optional, absent
    assert store(cfg, "P2")["flow"].to_list() == [50]
    # layout: equipment_type=/equipment=/month=, partition columns come back through hive partitioning
    files = sorted(p.relative_to(cfg.store).as_posix() for p in cfg.store.rglob("*.parquet"))
    assert files == ["equipment_type=pump/equipment=P1/month=2024-01/part-0.parquet",
                     "equipment_type=pump/equipment=P2/month=2024-01/part-0.parquet"]
    assert set(p1["equipment_type"]) == {"pump"}
    assert pl.read_parquet(cfg.store / files[0]).columns == [
        "timestamp", "flow", "pressure", "vibration", "flow__missing", "pressure__missing", "vibration__missing"]
    # P1 has one gap: 10:03..10:05 has no reading and the fill covers 2 steps only
    assert r.report.gaps == 1 and r.report.gap_list[0]["start"].startswith("2024-01-15T10:02")
    assert r.watermark.max_ts == {"P1": utc(2024, 1, 15, 10, 6), "P2": utc(2024, 1, 15, 10, 2)}


def test_months_partition_in_utc_and_fixed_equipment_id(tmp_path):
    src = {**WIDE, "equipment_id": "P/9 x", "timezone": "America/New_York"}
    del src["equipment_id_column"]
    cfg = plant(tmp_path, [src])
    write_raw(tmp_path, "a.csv", wide_csv([("2024-01-31 18:59:00", 1, 1), ("2024-01-31 19:00:00", 2, 2)],
                                          header="timestamp,flow,pressure"))
    ingest(cfg)
    df = store(cfg)
    assert df["timestamp"].to_list() == [utc(2024, 1, 31, 23, 59), utc(2024, 2, 1, 0, 0)]
    assert df["month"].to_list() == ["2024-01", "2024-02"]  # UTC months, not local ones
    assert set(df["equipment"]) == {"P/9 x"}  # percent-encoded in the path, decoded on read
    assert (cfg.store / "equipment_type=pump" / "equipment=P%2F9%20x").is_dir()


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])
def test_month_and_chunk_boundaries_join_seamlessly(tmp_path, monkeypatch, chunk_bytes):
    """Stage B works on chunks of an equipment's staged 32-day periods (here one at a time, or all at once); the
    fill, the gaps, the duplicates and the month files do not notice."""
    monkeypatch.setattr("pipelines.ingest.run.CHUNK_BYTES", chunk_bytes)
    cfg = plant(tmp_path, max_ffill=2)
    rows = [("2024-01-31 23:57:00", "P1", 1, 1), ("2024-01-31 23:58:00", "P1", 2, 1),
            ("2024-02-01 00:02:00", "P1", 3, 1),  # 23:59 and 00:00 filled across the month boundary
            ("2024-02-01 00:02:00", "P1", 3, 1),  # exact duplicate
            ("2024-02-22 23:58:00", "P1", 4, 1),  # a staging period ends at Feb 23 00:00 UTC: the fill crosses it
            ("2024-02-23 00:01:00", "P1", 5, 1),
            ("2024-03-01 00:00:00", "P1", 9, 1)]  # a week later: one long gap
    write_raw(tmp_path, "a.csv", wide_csv(rows))
    r = ingest(cfg)
    df = store(cfg)
    assert df.height == 3 + 29 * 1440 + 1  # a contiguous grid from Jan 31 23:57 to Mar 1 00:00
    head = df.head(6)
    assert head["flow"].to_list() == [1, 2, 2, 2, None, 3]
    assert head["flow__missing"].to_list() == [False, False, True, True, True, False]
    edge = df.filter(pl.col("timestamp").is_between(utc(2024, 2, 22, 23, 58), utc(2024, 2, 23, 0, 1)))
    assert edge["flow"].to_list() == [4, 4, 4, 5] and edge["flow__missing"].to_list() == [False, True, True, False]
    assert r.report.deduplicated == 1 and r.report.gaps == 3
    assert df["timestamp"].diff().drop_nulls().unique().to_list() == [timedelta(minutes=1)]
    assert sorted(p.parent.name for p in cfg.store.rglob("*.parquet")) == [  # one file per UTC month
        "month=2024-01", "month=2024-02", "month=2024-03"]


@pytest.mark.parametrize("chunk_bytes", [1, 2500])
def test_chunks_of_logs_out_of_time_order_give_the_store_of_one_chunk(tmp_path, monkeypatch, chunk_bytes):
    """An equipment's staged rows (one file per log, all its periods) are read a chunk of periods at a time as
    row ranges of each file from the first row of the chunk's periods to the last, filtered to those periods:
    logs out of time order (here shuffled and split over two files, a period's rows interleaved with the
    others') give the same store, counts and quarantine as reading everything at once."""
    rows = [(f"2024-{m:02d}-{d:02d} {h:02d}:{mi:02d}:00", eq, (m * d + h + mi) % 97, 1 + mi % 3)
            for eq in ("P1", "P2") for m in (1, 2, 3, 4) for d in (3, 17, 28) for h in (0, 11) for mi in (0, 5)]
    rows += [rows[7], ("2024-02-17 11:05:00", "P1", 1000, 1), ("junk", "P1", 1, 1)]  # duplicate, conflict, bad
    shuffled = [rows[i] for i in np.random.default_rng(5).permutation(len(rows))]
    seen = []  # the chunks of each equipment
    orig = run_mod._chunks
    monkeypatch.setattr(run_mod, "_chunks", lambda folders: seen.append(orig(folders)) or seen[-1])
    results = {}
    for name, bytes_ in (("one chunk", 1 << 30), ("chunked", chunk_bytes)):
        monkeypatch.setattr(run_mod, "CHUNK_BYTES", bytes_)
        seen.clear()
        root = tmp_path / name.replace(" ", "_")
        cfg = plant(root, max_ffill=1)
        write_raw(root, "a.csv", wide_csv(shuffled[: len(rows) // 2]))
        write_raw(root, "b.csv", wide_csv(shuffled[len(rows) // 2:]))
        r = ingest(cfg)
        q = quarantine(r).with_columns(pl.col("file").str.split("/").list.last()).sort("file", "line")
        results[name] = (store(cfg), q, r.report.deduplicated, r.report.quarantined, r.report.kept)
    # the chunks really are several (periods of 32 days: January to April is four), their row ranges overlap
    assert len(seen) == 2 and all(len(c) >= 2 and c[0].periods is not None for c in seen)
    assert any(c[0].slices[0][2] > 0 and c[1].slices[0][1] < c[0].slices[0][1] + c[0].slices[0][2] for c in seen)
    one, chunked = results["one chunk"], results["chunked"]
    assert one[0].height > 0 and one[0].equals(chunked[0])
    assert one[1].equals(chunked[1]) and one[2:] == chunked[2:]
    assert one[2] == 1 and one[3] == 3  # the duplicate; both versions of the conflict and the junk row


def test_worker_processes_give_the_same_result(tmp_path):
    rows = [(f"2024-01-{d:02d} {h:02d}:{m:02d}:00", eq, (d * h + m) % 50, 1 + m % 4)
            for eq in ("P1", "P2", "P3") for d in (30, 31) for h in (0, 23) for m in range(0, 60, 7)]
    rows += [("2024-02-01 00:03:00", "P2", 1, 1), ("2024-02-01 00:03:00", "P2", 2, 1), ("junk", "P1", 1, 1)]
    results = {}
    for workers in (1, 2):
        cfg = plant(tmp_path / str(workers), max_ffill=3)
        write_raw(tmp_path / str(workers), "a.csv", wide_csv(rows))
        r = ingest(cfg, workers=workers)
        results[workers] = (store(cfg), r.report.quarantined_by_reason, r.report.gaps, r.report.kept,
                            r.watermark.max_ts)
    assert results[1][0].equals(results[2][0]) and results[1][1:] == results[2][1:]
    assert results[2][1] == {"conflicting_duplicate": 2, "bad_timestamp": 1}


@pytest.mark.parametrize("policy,expected_utc,quarantined", [
    # Europe/Berlin, 2024-10-27: 02:00-02:59 local happens twice (CEST = UTC+2, then CET = UTC+1)
    ("infer", [(0, 30), (0, 45), (1, 15), (1, 30), (2, 0)], {}),
    # both 02:30 readings land on the same instant with different values: conflicting duplicates
    ("earliest", [(0, 15), (0, 45), (2, 0)], {"conflicting_duplicate": 2}),
    ("latest", [(1, 15), (1, 45), (2, 0)], {"conflicting_duplicate": 2}),
    ("quarantine", [(2, 0)], {"dst_ambiguous": 4}),
])
def test_dst_repeated_hour(tmp_path, policy, expected_utc, quarantined):
    cfg = plant(tmp_path, timezone="Europe/Berlin", ambiguous=policy, grid="15m", max_ffill=0)
    write_raw(tmp_path, "a.csv", wide_csv([
        ("2024-10-27 02:30:00", "P1", 1, 1), ("2024-10-27 02:45:00", "P1", 2, 1),
        ("2024-10-27 02:15:00", "P1", 3, 1), ("2024-10-27 02:30:00", "P1", 4, 1),  # back in time: second pass
        ("2024-10-27 03:00:00", "P1", 5, 1),
    ]))
    r = ingest(cfg)
    observed = store(cfg).filter(~pl.col("flow__missing"))
    assert [(t.hour, t.minute) for t in observed["timestamp"]] == expected_utc
    assert r.report.quarantined_by_reason == quarantined
    if policy == "infer":
        assert observed["flow"].to_list() == [1, 2, 3, 4, 5]
        assert r.report.dst_ambiguous_resolved == 4


def test_dst_gap_and_offsets(tmp_path):
    cfg = plant(tmp_path, timezone="Europe/Berlin")
    write_raw(tmp_path, "a.csv", wide_csv([
        ("2024-03-31 01:59:00", "P1", 1, 1), ("2024-03-31 02:30:00", "P1", 2, 1),  # 02:30 does not exist
        ("2024-03-31 03:00:00", "P1", 3, 1)]))
    r = ingest(cfg)
    q = quarantine(r)
    assert q.select("line", "reason").rows() == [(3, "dst_nonexistent")]
    assert q["raw"].to_list() == ["2024-03-31 02:30:00,P1,2,1"]
    assert store(cfg).filter(~pl.col("flow__missing"))["timestamp"].to_list() == [
        utc(2024, 3, 31, 0, 59), utc(2024, 3, 31, 1, 0)]


@pytest.mark.parametrize("tz", ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Africa/Casablanca",
                                "Pacific/Apia", "America/Sao_Paulo", "Antarctica/Troll", "Asia/Kolkata"])
def test_local_times_match_polars_conversions(tz):
    """Converting each distinct hour (and only the rows of hours with a clock change one by one) gives what
    converting every row twice, for the earliest and the latest reading, gives: 30 min set-backs, Ramadan
    breaks, skipped days, 2 h shifts, local mean time and far-future rules included."""
    from pipelines.config import SourceConfig
    from pipelines.ingest.quality import timestamp_stages

    naive = pl.concat([pl.datetime_range(datetime(a, 1, 1), datetime(b, 1, 1), "30m", eager=True, time_unit="us")
                       for a, b in ((1890, 1892), (1940, 1946), (2010, 2027), (2195, 2197))])
    naive = naive.append(naive.dt.offset_by("5m") + timedelta(microseconds=1))  # inside and off the half hours
    src = SourceConfig("s", "x", "pump", timestamp_format="%Y-%m-%d %H:%M:%S%.f", timezone=tz)
    lf = pl.DataFrame({"t": naive.dt.strftime("%Y-%m-%d %H:%M:%S%.f")}).lazy()
    for step in timestamp_stages("t", src, pl.String):
        lf = lf.with_columns(step)
    got = lf.select("ts_e", "ts_l", "_amb", "_nonexist").collect()
    n = pl.lit(naive)
    e = n.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null").dt.convert_time_zone("UTC")
    late = n.dt.replace_time_zone(tz, ambiguous="latest", non_existent="null").dt.convert_time_zone("UTC")
    want = pl.select(e.alias("ts_e"), late.alias("ts_l"), (e != late).fill_null(False).alias("_amb"),
                     e.is_null().alias("_nonexist"))
    assert got.equals(want)
    assert tz == "Asia/Kolkata" or got["_amb"].sum() > 0


def test_timestamps_with_offsets_ignore_zone(tmp_path):
    cfg = plant(tmp_path, timestamp_format="%Y-%m-%dT%H:%M:%S%.f%:z", timezone="Asia/Tokyo", grid="1s")
    write_raw(tmp_path, "a.csv", wide_csv([("2024-10-27T02:30:00+02:00", "P1", 1, 1),
                                           ("2024-10-27T02:30:00.500+01:00", "P1", 2, 1)]))
    ingest(cfg)
    obs = store(cfg).filter(~pl.col("flow__missing"))
    # as-of alignment: 01:30:00.5 belongs to the grid point 01:30:01
    assert obs["timestamp"].to_list() == [utc(2024, 10, 27, 0, 30), utc(2024, 10, 27, 1, 30, 1)]


def test_exact_and_conflicting_duplicates(tmp_path):
    cfg = plant(tmp_path)
    write_raw(tmp_path, "a.csv", wide_csv([
        ("2024-01-15 10:00:00", "P1", 10, 2), ("2024-01-15 10:00:00", "P1", 10.0, 2.00),  # exact (same numbers)
        ("2024-01-15 10:01:00", "P1", 11, 2), ("2024-01-15 10:01:00", "P1", 12, 2),       # conflict
        ("2024-01-15 10:01:00", "P1", 11, 2),                                             # dup of a conflict
        ("2024-01-15 10:01:00", "P2", 11, 2),                                             # other equipment
    ]))
    write_raw(tmp_path, "b.csv", wide_csv([("2024-01-15 10:00:00", "P1", 10, 2)]))  # across files
    r = ingest(cfg)
    assert r.report.deduplicated_by_reason == {"exact_duplicate": 3}
    assert r.report.quarantined_by_reason == {"conflicting_duplicate": 2}
    assert quarantine(r)["line"].to_list() == [4, 5]
    assert (r.report.rows_in, r.report.kept) == (7, 2)
    by_file = {Path(f.path).name: (f.rows_in, f.kept, f.deduplicated, f.quarantined) for f in r.report.files}
    assert by_file == {"a.csv": (6, 2, 2, 2), "b.csv": (1, 0, 1, 0)}
    # the conflicting 10:01 has no version left, so P1's grid ends at 10:00
    assert store(cfg, "P1")["flow"].to_list() == [10] and store(cfg, "P2")["flow"].to_list() == [11]


def test_quality_words_sentinels_limits_and_quality_pairs(tmp_path):
    cfg = plant(tmp_path, quality_suffix="_q", sentinels=[-9999.0, 9999.0])
    header = "timestamp,equipment_id,flow,flow_q,pressure,pressure_q"
    write_raw(tmp_path, "a.csv", wide_csv([
        ("2024-01-15 10:00:00", "P1", "Shutdown", "", 2, "Good"),
        ("2024-01-15 10:01:00", "P1", " I/O Timeout ", "", "-9999", "Good"),
        ("2024-01-15 10:02:00", "P1", 500, "", "NaN", ""),
        ("2024-01-15 10:03:00", "P1", 10, "Bad_SensorFailure", 3, "Uncertain_LastUsable"),
        ("2024-01-15 10:04:00", "P1", 11, "??", "twelve", "good"),
        ("2024-01-15 10:05:00", "P1", -1, "", "9999", ""),
        ("2024-01-15 10:06:00", "P1", 12, "Good", 4, "Good"),
    ], header=header))
    r = ingest(cfg)
    assert r.report.kept == 7 and r.report.quarantined == 0
    assert r.report.nulled_by_sensor == {
        "flow": {"state_word": 2, "out_of_range": 2, "quality_bad": 1, "quality_unknown": 1},
        "pressure": {"sentinel": 2, "not_finite": 1, "quality_uncertain": 1, "not_numeric": 1},
    }
    assert r.report.nulled == 11
    assert r.report.files[0].not_numeric_first_line == {"pressure": 6}
    assert store(cfg)["pressure__missing"].to_list() == [False, True, True, True, True, True, False]
    assert store(cfg)["flow__missing"].to_list() == [True] * 6 + [False]
    # keep_uncertain keeps the Uncertain reading
    cfg2 = plant(tmp_path / "k", quality_suffix="_q", keep_uncertain=True)
    write_raw(tmp_path / "k", "a.csv", wide_csv([("2024-01-15 10:03:00", "P1", 10, "", 3, "Uncertain")],
                                                header=header))
    ingest(cfg2)
    assert store(cfg2)["pressure"].to_list() == [3.0]


def test_stuck_sensor_reported(tmp_path):
    cfg = plant(tmp_path, stuck_steps=3)
    flow = {**{m: 5.0 for m in range(2, 8)}, **{m: 9.0 for m in (12, 13, 15, 16)}, 14: ""}  # 10:14 no reading
    rows = [(f"2024-01-15 10:{m:02d}:00", "P1", flow.get(m, m), 1.0 + m) for m in range(20)]
    write_raw(tmp_path, "a.csv", wide_csv(rows))
    r = ingest(cfg)
    assert r.report.stuck == 2
    assert [(s["sensor"], s["steps"], s["value"], s["start"][11:16], s["end"][11:16]) for s in r.report.stuck_list] == [
        ("flow", 6, 5.0, "10:02", "10:07"), ("flow", 4, 9.0, "10:12", "10:16")]  # a missing reading does not end a run


def test_schema_drift(tmp_path):
    cfg = plant(tmp_path)
    write_raw(tmp_path, "a.csv", wide_csv([("2024-01-15 10:00:00", "P1", 1, 2, 3, "x")],
                                          header="timestamp,equipment_id,flow,pressure,vibration,humidity"))
    r = ingest(cfg)
    assert r.report.unknown_columns == ["humidity"] and "humidity" not in store(cfg).columns
    assert store(cfg)["vibration"].to_list() == [3.0]
    write_raw(tmp_path, "b.csv", wide_csv([("2024-01-15 10:01:00", "P1", 1)], header="timestamp,equipment_id,flow"))
    with pytest.raises(ValueError, match=r"b\.csv, line 1: required sensor 'pressure' of equipment type 'pump'"):
        ingest(cfg, r.watermark)


def test_failed_batch_leaves_store_and_quarantine_untouched(tmp_path):
    cfg = plant(tmp_path)
    write_raw(tmp_path, "a.csv", wide_csv([("2024-01-15 10:00:00", "P1", 1, 2), ("bad", "P1", 1, 2)]))
    write_raw(tmp_path, "b.csv", "timestamp;equipment_id;flow;pressure\n")
    with pytest.raises(ValueError, match="wrong delimiter"):
        ingest(cfg)
    assert not list(cfg.store.rglob("*.parquet")) and not cfg.quarantine.exists()
    assert not (cfg.store / ".staging").exists()


# --- long layout -----------------------------------------------------------------------------------------


def long_csv(rows: list[tuple]) -> str:
    return "tag,timestamp,value,quality\n" + "".join(",".join(str(x) for x in r) + "\n" for r in rows)


def test_long_layout_pivots_and_aligns_irregular_readings(tmp_path):
    cfg = plant(tmp_path, [LONG])
    write_raw(tmp_path, "h.csv", long_csv([
        ("P1.flow", "2024-01-15 10:00:00", 10, "Good"),
        ("P1.pressure", "2024-01-15 10:00:20", 2, "Good"),      # belongs to 10:01 (as-of alignment)
        ("P1.flow", "2024-01-15 10:00:40", 11, "Good"),
        ("P1.flow", "2024-01-15 10:00:50", 12, "Good"),         # last reading in (10:00, 10:01] wins
        ("P1.flow", "2024-01-15 10:02:00", "Shutdown", "Bad"),
        ("P1.temperature", "2024-01-15 10:02:00", 70, "Good"),  # unknown sensor: quarantined, reported
        ("Line.2.P-7.flow", "2024-01-15 10:02:00", 5, "Good"),  # dotted equipment id
        ("P1.flow", "2024-01-15 10:03:00", 13, ""),
        ("P1.flow", "2024-01-15 10:03:00", 13, ""),              # exact duplicate
        ("P1.pressure", "2024-01-15 10:03:00", 3, "Good"),
        ("P1.pressure", "2024-01-15 10:03:00", 4, "Good"),       # conflicting duplicate
    ]))
    r = ingest(cfg)
    assert r.report.quarantined_by_reason == {"unknown_sensor": 1, "conflicting_duplicate": 2}
    assert r.report.unknown_sensors == ["P1.temperature"]
    assert r.report.deduplicated == 1 and r.report.nulled_by_reason == {"quality_bad": 1}
    p1 = store(cfg, "P1")
    assert p1["timestamp"].to_list() == [utc(2024, 1, 15, 10, m) for m in range(4)]
    assert p1["flow"].to_list() == [10, 12, 12, 13]
    assert p1["flow__missing"].to_list() == [False, False, True, False]
    assert p1["pressure"].to_list() == [None, 2, 2, 2]
    assert store(cfg, "Line.2.P-7")["flow"].to_list() == [5]


def test_long_and_wide_give_the_same_store(tmp_path):
    rows = []
    for m in range(30):
        for eq in ("P1", "P2"):
            if (m + len(eq)) % 7 == 3:
                continue  # a missing row now and then
            rows.append((f"2024-01-15 10:{m:02d}:00", eq, (m * 3.7) % 40, 1 + (m % 5) * 0.5))
    wide = plant(tmp_path / "w", max_ffill=1)
    write_raw(tmp_path / "w", "a.csv", wide_csv(rows))
    long = plant(tmp_path / "l", [{**LONG, "max_ffill": 1}])
    write_raw(tmp_path / "l", "a.csv", long_csv(
        [(f"{eq}.{s}", ts, v, "Good") for ts, eq, f, p in rows for s, v in (("flow", f), ("pressure", p))]))
    rw, rl = ingest(wide), ingest(long)
    assert rl.report.rows_in == 2 * rw.report.rows_in
    assert store(wide).equals(store(long))


def test_long_required_sensor_without_readings(tmp_path):
    cfg = plant(tmp_path, [LONG])
    write_raw(tmp_path, "h.csv", long_csv([("P1.flow", "2024-01-15 10:00:00", 10, "Good")]))
    with pytest.raises(ValueError, match=r"h\.csv: required sensor 'pressure' has no readings"):
        ingest(cfg)


def test_parquet_sources_wide_and_long(tmp_path):
    naive = [datetime(2024, 10, 27, 2, 30), datetime(2024, 10, 27, 2, 45)]
    pl.DataFrame({"timestamp": naive, "equipment_id": ["P1", "P1"], "flow": [1.0, None],
                  "pressure": ["2", "Shutdown"]}).write_parquet(write_raw(tmp_path, "w.parquet", b""))
    long_rows = {"tag": ["P2.flow", "P2.pressure"], "timestamp": [utc(2024, 1, 1, 0, 0)] * 2,
                 "value": [5.0, 500.0], "quality": ["Good", "Good"]}
    pl.DataFrame(long_rows).write_parquet(write_raw(tmp_path, "l.parquet", b""))
    cfg = plant(tmp_path, [{**WIDE, "path": "raw/w.parquet", "timezone": "Europe/Berlin"},
                           {**LONG, "path": "raw/l.parquet"}])
    rw = ingest(cfg, source=0)
    assert rw.report.nulled_by_reason == {"state_word": 1}
    assert store(cfg, "P1").filter(~pl.col("pressure__missing"))["timestamp"].to_list() == [utc(2024, 10, 27, 0, 30)]
    rl = ingest(cfg, source=1)
    assert rl.report.nulled_by_reason == {"out_of_range": 1}
    assert store(cfg, "P2")["flow"].to_list() == [5.0]
    # a rejected parquet row keeps its row number and its content as JSON
    pl.DataFrame({"tag": ["nodot"], "timestamp": [utc(2024, 1, 1)], "value": [1.0], "quality": ["Good"]}
                 ).write_parquet(tmp_path / "raw" / "l.parquet")
    q = quarantine(ingest(cfg, rl.watermark, source=1))
    assert q.select("line", "reason").rows() == [(1, "bad_tag")]
    assert json.loads(q["raw"][0])["tag"] == "nodot"


def test_report_json_and_table(tmp_path):
    cfg = plant(tmp_path)
    write_raw(tmp_path, "a.csv", wide_csv([("2024-01-15 10:00:00", "P1", 1, 2), ("oops", "P1", 1, 2),
                                           ("2024-01-15 10:01:00", "P1", "Shutdown", 2)]))
    report = IngestReport(sources=[ingest(cfg).report])
    report.check()
    data = json.loads(write_report(report, tmp_path / "r" / "report.json").read_text())
    assert data["totals"] == {"files_seen": 1, "files_read": 1, "rows_in": 3, "kept": 2, "deduplicated": 0,
                              "quarantined": 1, "nulled": 1, "gaps": 0, "stuck": 0}
    assert data["sources"][0]["quarantined_by_reason"] == {"bad_timestamp": 1}
    table = format_table(report)
    assert "rows in" in table and "quarantined: bad_timestamp 1" in table and "nulled: state_word 1" in table
    total = next(line for line in table.splitlines() if line.startswith("TOTAL"))
    assert total.split() == ["TOTAL", "1/1", "3", "2", "0", "1", "1", "0", "0"]
