"""Incremental ingest: watermarks, unchanged / appended / touched / rewritten files, idempotent commits, and
the `rmamba ingest` command end to end against its SQLite database."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import sqlalchemy as sa
from test_ingest import ingest, plant, quarantine, store, wide_csv, write_plant, write_raw

from app.cli import main


def _rows(start: int, stop: int, eq: str = "P1") -> list[tuple]:
    return [(f"2024-01-15 {m // 60:02d}:{m % 60:02d}:00", eq, float(m % 17), 1.0 + (m % 3)) for m in range(start, stop)]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file under ``root``."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_rerun_on_unchanged_input_changes_nothing(tmp_path):
    cfg = plant(tmp_path, max_ffill=3)
    write_raw(tmp_path, "a.csv", wide_csv(_rows(0, 30) + _rows(0, 30, "P2")))
    first = ingest(cfg, run_id="r1")
    before = snapshot(cfg.store)
    second = ingest(cfg, first.watermark, run_id="r2")
    assert [f.status for f in second.report.files] == ["unchanged"]
    assert (second.report.rows_in, second.report.kept, second.report.partitions_written) == (0, 0, 0)
    assert snapshot(cfg.store) == before  # same bytes, not even rewritten
    assert second.watermark == first.watermark
    # touching the file (new mtime, same bytes) is recognised by its hash
    os.utime(tmp_path / "raw" / "a.csv", ns=(1, 1))
    third = ingest(cfg, second.watermark, run_id="r3")
    assert [f.status for f in third.report.files] == ["touched"] and third.report.rows_in == 0
    assert snapshot(cfg.store) == before
    assert third.watermark.files[str((tmp_path / "raw" / "a.csv").resolve())].mtime_ns == 1
    # no duplicate rows in the store
    df = store(cfg)
    assert df.height == df.select("equipment", "timestamp").unique().height == 60


def test_appended_rows_equal_a_single_full_ingest(tmp_path):
    """A log that grows between runs ends up exactly as if it had been ingested once, in full."""
    rows = _rows(0, 50)
    rows = [r for r in rows if not 15 <= int(r[0][-5:-3]) <= 19]  # a gap across the first batch boundary
    inc = plant(tmp_path / "inc", max_ffill=3, stuck_steps=0)
    path = write_raw(tmp_path / "inc", "a.csv", wide_csv(rows[:15]))
    r1 = ingest(inc, run_id="r1")
    with open(path, "a") as fh:
        fh.write(wide_csv(rows[15:30]).split("\n", 1)[1])
    r2 = ingest(inc, r1.watermark, run_id="r2")
    assert [f.status for f in r2.report.files] == ["appended"]
    assert r2.report.rows_in == 15 and r2.report.deduplicated == 0
    with open(path, "a") as fh:
        fh.write(wide_csv(rows[30:]).split("\n", 1)[1])
    r3 = ingest(inc, r2.watermark, run_id="r3")
    assert r3.report.rows_in == len(rows) - 30
    assert r3.watermark.files[str(path.resolve())].lines == len(rows)

    full = plant(tmp_path / "full", max_ffill=3, stuck_steps=0)
    write_raw(tmp_path / "full", "a.csv", wide_csv(rows))
    ingest(full)
    assert store(inc).equals(store(full))


def test_new_file_and_rewritten_file(tmp_path):
    cfg = plant(tmp_path)
    write_raw(tmp_path, "a.csv", wide_csv(_rows(0, 10)))
    r1 = ingest(cfg)
    before_a = store(cfg)
    write_raw(tmp_path, "b.csv", wide_csv(_rows(10, 20)))
    r2 = ingest(cfg, r1.watermark)
    assert {Path(f.path).name: f.status for f in r2.report.files} == {"a.csv": "unchanged", "b.csv": "new"}
    assert r2.report.rows_in == 10 and store(cfg).height == 20
    assert store(cfg).head(10).equals(before_a)
    # a re-export of a.csv: same rows (already stored), one changed value (cannot be applied: quarantined),
    # and new rows after the watermark
    rows = _rows(0, 10)
    rows[3] = (rows[3][0], "P1", 99.0, rows[3][3])
    write_raw(tmp_path, "a.csv", wide_csv(rows + _rows(20, 25)))
    r3 = ingest(cfg, r2.watermark)
    assert {Path(f.path).name: f.status for f in r3.report.files} == {"a.csv": "changed", "b.csv": "unchanged"}
    assert r3.report.deduplicated_by_reason == {"already_stored": 9}
    assert r3.report.quarantined_by_reason == {"before_watermark": 1}
    assert quarantine(r3)["line"].to_list() == [5]
    assert r3.report.kept == 5
    df = store(cfg)
    assert df.height == 25 and df["flow"][3] == 3.0  # the stored value stands


def test_new_rows_merge_into_the_existing_month_file(tmp_path):
    """A later batch for a month already in the store replaces that month's one file: the stored rows stay, the
    new rows join them, nothing is there twice, other equipment is not rewritten; the store ends up as one
    ingest of everything would have made it."""
    rows_a = _rows(0, 30) + _rows(0, 10, "P2")
    inc = plant(tmp_path / "inc", max_ffill=3)
    write_raw(tmp_path / "inc", "a.csv", wide_csv(rows_a))
    r1 = ingest(inc, run_id="r1")
    p1_file = inc.store / "equipment_type=pump" / "equipment=P1" / "month=2024-01" / "part-0.parquet"
    before = pl.read_parquet(p1_file)
    p2_before = snapshot(inc.store / "equipment_type=pump" / "equipment=P2")
    write_raw(tmp_path / "inc", "b.csv", wide_csv(_rows(40, 60)))  # P1, later the same month (after a gap)
    r2 = ingest(inc, r1.watermark, run_id="r2")
    assert (r2.report.rows_in, r2.report.kept, r2.report.partitions_written) == (20, 20, 1)
    assert sorted(p.relative_to(inc.store).as_posix() for p in inc.store.rglob("*")
                  if p.is_file()) == ["equipment_type=pump/equipment=P1/month=2024-01/part-0.parquet",
                                      "equipment_type=pump/equipment=P2/month=2024-01/part-0.parquet"]
    after = pl.read_parquet(p1_file)
    assert after.height == 60 and after["timestamp"].is_sorted() and after["timestamp"].n_unique() == 60
    assert after.head(30).equals(before)  # the stored rows, untouched
    assert after["flow__missing"].sum() == 10  # the gap 00:30..00:39: 3 filled steps, then nulls
    assert snapshot(inc.store / "equipment_type=pump" / "equipment=P2") == p2_before
    r3 = ingest(inc, r2.watermark, run_id="r3")  # and again: nothing changes
    assert r3.report.partitions_written == 0 and pl.read_parquet(p1_file).equals(after)

    full = plant(tmp_path / "full", max_ffill=3)
    write_raw(tmp_path / "full", "a.csv", wide_csv(rows_a + _rows(40, 60)))
    ingest(full)
    assert store(inc).equals(store(full))


def test_a_second_source_keeps_the_stored_tail_of_a_month(tmp_path):
    """Rows of another source before the stored ones rewrite the month without dropping the grid rows that
    lead to the next month's first reading."""
    src = {"path": "raw/a*.csv", "timestamp_format": "%Y-%m-%d %H:%M:%S", "timezone": "UTC",
           "equipment_type": "pump", "equipment_id_column": "equipment_id", "max_ffill": 3, "stuck_steps": 0}
    cfg = plant(tmp_path, [src, {**src, "path": "raw/b*.csv"}])
    write_raw(tmp_path, "a.csv", wide_csv([("2024-01-31 23:50:00", "P1", 5, 1), ("2024-02-01 00:10:00", "P1", 6, 1)]))
    write_raw(tmp_path, "b.csv", wide_csv([("2024-01-31 23:40:00", "P1", 4, 1)]))
    ingest(cfg, source=0)
    ingest(cfg, source=1)
    df = store(cfg)
    assert df["timestamp"].to_list() == [datetime(2024, 1, 31, 23, 40, tzinfo=UTC) + timedelta(minutes=i)
                                         for i in range(31)]
    assert df.filter(~pl.col("flow__missing"))["flow"].to_list() == [4, 5, 6]
    assert df["month"].unique().sort().to_list() == ["2024-01", "2024-02"]


def test_commit_without_watermark_is_idempotent(tmp_path):
    """If the process dies after writing the store but before the watermark is saved, the rerun reads the
    same rows again and writes identical data (no duplicates)."""
    cfg = plant(tmp_path, max_ffill=2)
    write_raw(tmp_path, "a.csv", wide_csv(_rows(0, 10)))
    r1 = ingest(cfg)
    path = write_raw(tmp_path, "b.csv", wide_csv(_rows(12, 20)))
    ingest(cfg, r1.watermark)  # committed, watermark "lost"
    after = store(cfg)
    r2b = ingest(cfg, r1.watermark)  # the rerun
    assert r2b.report.rows_in == 8 and path.exists()
    assert store(cfg).equals(after)
    assert after.height == 20 and after.select("timestamp").unique().height == 20


def test_full_rerun_counts_stored_rows_as_duplicates(tmp_path):
    cfg = plant(tmp_path)
    write_raw(tmp_path, "a.csv", wide_csv(_rows(0, 10) + [("bad", "P1", 1, 1)]))
    r1 = ingest(cfg)
    before = store(cfg)
    r2 = ingest(cfg, r1.watermark, full=True)
    assert r2.report.deduplicated_by_reason == {"already_stored": 10}
    assert r2.report.quarantined_by_reason == {"bad_timestamp": 1} and r2.report.kept == 0
    assert store(cfg).equals(before)


def test_no_temporary_files_left(tmp_path):
    cfg = plant(tmp_path)
    write_raw(tmp_path, "a.csv", wide_csv(_rows(0, 5) + [("bad", "P1", 1, 1)]))
    ingest(cfg)
    leftovers = [p for p in list(cfg.store.rglob("*")) + list(cfg.quarantine.rglob("*"))
                 if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []


# --- the CLI, with the application database --------------------------------------------------------------


def test_cli_ingest_twice_then_error(tmp_path, capsys):
    config = write_plant(tmp_path)
    write_raw(tmp_path, "a.csv", wide_csv(_rows(0, 20) + [("2024-13-01 00:00:00", "P1", 1, 1)]))
    assert main(["ingest", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "TOTAL" in out and "quarantined: bad_timestamp 1" in out
    reports = sorted((tmp_path / "reports").glob("ingest-*.json"))
    assert len(reports) == 1 and json.loads(reports[0].read_text())["totals"]["rows_in"] == 21
    before = snapshot(tmp_path / "store")

    assert main(["ingest", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("TOTAL")).split()
    assert total[:4] == ["TOTAL", "0/1", "0", "0"]
    assert snapshot(tmp_path / "store") == before

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'plant.db'}")
    with engine.connect() as c:
        files = c.execute(sa.text("SELECT source, path, lines FROM ingest_files")).all()
        marks = c.execute(sa.text("SELECT source, equipment, max_ts FROM ingest_watermarks")).all()
        runs = c.execute(sa.text("SELECT status, rows_in, kept, quarantined FROM ingest_runs ORDER BY id")).all()
    assert files == [("s0", str((tmp_path / "raw" / "a.csv").resolve()), 21)]
    assert [(s, e) for s, e, _ in marks] == [("s0", "P1")] and str(marks[0][2]).startswith("2024-01-15 00:19")
    assert runs == [("ok", 21, 20, 1), ("ok", 0, 0, 0)]

    write_raw(tmp_path, "b.csv", "timestamp,equipment_id,flow\n2024-01-15 01:00:00,P1,1\n")
    assert main(["ingest", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "b.csv, line 1: required sensor 'pressure'" in err and "Traceback" not in err
    with engine.connect() as c:
        last = c.execute(sa.text("SELECT status, error FROM ingest_runs ORDER BY id DESC LIMIT 1")).one()
    assert last[0] == "failed" and "required sensor 'pressure'" in last[1]
    assert snapshot(tmp_path / "store") == before


def test_cli_subprocess_progress_and_source_filter(tmp_path, capsys):
    config = write_plant(tmp_path, [
        {"name": "a", "path": "raw/a*.csv", "timestamp_format": "%Y-%m-%d %H:%M:%S", "timezone": "UTC",
         "equipment_type": "pump", "equipment_id_column": "equipment_id"},
        {"name": "b", "path": "raw/b*.csv", "timestamp_format": "%Y-%m-%d %H:%M:%S", "timezone": "UTC",
         "equipment_type": "pump", "equipment_id_column": "equipment_id"}])
    write_raw(tmp_path, "a1.csv", wide_csv(_rows(0, 5)))
    write_raw(tmp_path, "b1.csv", wide_csv(_rows(0, 5, "P9")))
    run = subprocess.run([sys.executable, "-m", "app.cli", "ingest", "--config", str(config), "--source", "b"],
                         capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": ""})
    assert run.returncode == 0, run.stderr
    assert "b " in run.stdout and "\na " not in run.stdout
    assert sorted(pl.scan_parquet(str(tmp_path / "store" / "**" / "*.parquet"), hive_partitioning=True)
                  .select("equipment").unique().collect()["equipment"]) == ["P9"]
    assert main(["ingest", "--config", str(config), "--source", "c"]) == 2
    err = capsys.readouterr().err
    assert "rmamba ingest: error: no source named 'c' (sources: a, b)" in err and "Traceback" not in err
