"""The application database on SQLite and PostgreSQL: migrations, models in step with them, ingest state."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from setuptools import find_packages

from app.db import alembic_config, current_revision, head_revision, make_engine, upgrade_to_head
from app.db.ingest_state import finish_run, load_watermark, recent_runs, reset_source, save_watermark, start_run
from app.db.migrate import MIGRATIONS, downgrade
from app.db.models import Base
from pipelines.ingest import FileState, SourceWatermark

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TABLES = {"alembic_version", "ingest_runs", "ingest_watermarks", "ingest_files"}


def _pg_reachable() -> str | None:
    try:
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", connect_timeout=3):
            return None
    except Exception as exc:  # noqa: BLE001 (any failure means: skip with the reason)
        return f"PostgreSQL at 127.0.0.1:5432/test unreachable: {type(exc).__name__}: {exc}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request, tmp_path):
    """(url, schema) of an empty database: a SQLite file, or a fresh PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'app.db'}", None
        return
    reason = _pg_reachable()
    if reason:
        pytest.skip(reason)
    schema = f"rmamba_test_{uuid.uuid4().hex[:10]}"
    admin = make_engine(PG_URL)
    with admin.begin() as c:
        c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield PG_URL, schema
    finally:
        with admin.begin() as c:
            c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_upgrade_is_idempotent_and_reversible(db):
    url, schema = db
    engine = upgrade_to_head(url, schema=schema)
    assert TABLES <= _tables(engine)
    assert current_revision(engine) == head_revision()
    chain = [r.revision for r in ScriptDirectory.from_config(alembic_config()).walk_revisions()]
    assert chain[-1] == "0001_ingest"  # the root: later features add revisions on top
    upgrade_to_head(engine)  # second start-up: nothing to do
    assert current_revision(engine) == head_revision()
    downgrade(engine, "base")
    assert _tables(engine) - {"alembic_version"} == set()
    upgrade_to_head(engine)
    assert TABLES <= _tables(engine)


def test_models_match_migrations(db):
    """Autogenerate finds no difference: the migration chain creates exactly what the models describe."""
    url, schema = db
    engine = upgrade_to_head(url, schema=schema)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_watermark_round_trip(db):
    url, schema = db
    engine = upgrade_to_head(url, schema=schema)
    assert load_watermark(engine, "s") == SourceWatermark("s")
    berlin = timezone(timedelta(hours=2))
    wm = SourceWatermark("s", files={"/raw/a.csv": FileState("/raw/a.csv", 10, 1_790_000_000_123_456_789, "a" * 64, 3),
                                     "/raw/b.csv": FileState("/raw/b.csv", 20, 5, "b" * 64, 0)},
                         max_ts={"P1": datetime(2024, 1, 15, 12, 0, 0, 123456, tzinfo=berlin),
                                 "P/2 x": datetime(2024, 1, 1, tzinfo=UTC)})
    save_watermark(engine, wm, "run1")
    got = load_watermark(engine, "s")
    assert got.files == wm.files
    assert got.max_ts == {"P1": datetime(2024, 1, 15, 10, 0, 0, 123456, tzinfo=UTC), "P/2 x": wm.max_ts["P/2 x"]}
    assert all(t.tzinfo is not None and t.utcoffset() == timedelta(0) for t in got.max_ts.values())
    # update one file, drop another, move one watermark; other sources are untouched
    save_watermark(engine, SourceWatermark("other", max_ts={"Q": datetime(2020, 1, 1, tzinfo=UTC)}))
    wm2 = SourceWatermark("s", files={"/raw/a.csv": FileState("/raw/a.csv", 15, 7, "c" * 64, 5)},
                          max_ts={**got.max_ts, "P1": datetime(2024, 2, 1, tzinfo=UTC)})
    save_watermark(engine, wm2, "run2")
    assert load_watermark(engine, "s") == wm2
    assert load_watermark(engine, "other").max_ts == {"Q": datetime(2020, 1, 1, tzinfo=UTC)}
    reset_source(engine, "s")
    assert load_watermark(engine, "s") == SourceWatermark("s")


def test_naive_datetimes_are_refused(db):
    url, schema = db
    engine = upgrade_to_head(url, schema=schema)
    with pytest.raises(ValueError, match="naive datetime"):
        save_watermark(engine, SourceWatermark("s", max_ts={"P1": datetime(2024, 1, 1)}))
    assert load_watermark(engine, "s") == SourceWatermark("s")  # nothing half-saved


def test_runs(db):
    url, schema = db
    engine = upgrade_to_head(url, schema=schema)
    start_run(engine, "r1", "plant", ["a", "b"])
    finish_run(engine, "r1", "ok", {"rows_in": 5, "kept": 4, "quarantined": 1, "files_read": 2}, "/r.json")
    start_run(engine, "r2", "plant", ["a"])
    finish_run(engine, "r2", "failed", error="ValueError: boom")
    r2, r1 = recent_runs(engine)
    assert (r1.status, r1.rows_in, r1.kept, r1.quarantined, r1.files_read, r1.sources) == ("ok", 5, 4, 1, 2, "a,b")
    assert r1.finished_at >= r1.started_at and r1.started_at.tzinfo is not None
    assert (r2.status, r2.error, r2.rows_in) == ("failed", "ValueError: boom", 0)
    with pytest.raises(sa.exc.IntegrityError):
        start_run(engine, "r1", "plant", [])


def test_concurrent_startups_migrate_once(db):
    """Several processes (CLI, scheduler, dashboard) starting at once on a fresh database all succeed."""
    url, schema = db
    # imports take a while: every process waits for the same instant, then migrates
    code = ("import sys, time; from app.db import upgrade_to_head; time.sleep(max(0, float(sys.argv[3]) - "
            "time.time())); upgrade_to_head(sys.argv[1], schema=sys.argv[2] or None)")
    start = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", code, url, schema or "", str(start)], stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    assert results == [(0, "")] * 4
    engine = make_engine(url, schema=schema)
    assert current_revision(engine) == head_revision()
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_threads_in_one_process_migrate_safely(tmp_path):
    errors: list[BaseException] = []

    def start() -> None:
        try:
            upgrade_to_head(f"sqlite:///{tmp_path / 'app.db'}").dispose()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_sqlite_connections_use_wal_and_busy_timeout(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'app.db'}")  # the folder is created
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 20000
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_plain_postgresql_url_gets_psycopg_driver():
    assert make_engine("postgresql://u@h/db").dialect.driver == "psycopg"


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url"])
def test_unsupported_urls(url):
    with pytest.raises(ValueError, match="database_url: expected sqlite:///<file> or postgresql"):
        make_engine(url)


def test_migration_scripts_ship_with_the_package():
    """The migrations are packages (with __init__.py), so a wheel built from pyproject includes them."""
    assert {"app.db", "app.db.migrations", "app.db.migrations.versions"} <= set(find_packages(include=["app*"]))
    files = {p.name for p in resources.files("app.db.migrations").iterdir()}
    assert {"env.py", "__init__.py", "versions"} <= files
    assert MIGRATIONS.is_dir() and (MIGRATIONS / "versions" / "0001_ingest.py").is_file()
