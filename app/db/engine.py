"""Engines from a database URL: SQLite with WAL and a busy timeout, or PostgreSQL through psycopg 3."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

SQLITE_BUSY_TIMEOUT_MS = 20_000  # concurrent writers (CLI, scheduler, dashboard) wait instead of failing


def make_engine(url: str, *, schema: str | None = None, echo: bool = False) -> Engine:
    """An engine for ``url``; ``schema`` (PostgreSQL only) sets the search_path of every connection."""
    try:
        u = make_url(url)
    except ArgumentError:
        raise ValueError(f"database_url: expected sqlite:///<file> or postgresql+psycopg://..., got {url!r}") from None
    backend = u.get_backend_name()
    if backend == "sqlite":
        if schema is not None:
            raise ValueError("schema= applies to PostgreSQL only")
        if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, echo=echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if backend == "postgresql":
        if u.drivername == "postgresql":  # psycopg 3 is the driver we ship; psycopg2 is not installed
            u = u.set(drivername="postgresql+psycopg")
        connect_args = {"options": f"-csearch_path={schema}"} if schema else {}
        return create_engine(u, echo=echo, pool_pre_ping=True, connect_args=connect_args)
    raise ValueError(f"database_url: expected sqlite:///<file> or postgresql+psycopg://..., got {url!r}")


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 (DB-API connection)
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    _set_wal(cur)  # readers do not block the writer
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; a crash loses at most the last commit
    cur.close()


def _set_wal(cur) -> None:  # noqa: ANN001 (DB-API cursor)
    """Switch to WAL, waiting for other connections as the busy timeout says: SQLite answers "database is locked"
    at once, without its busy handler, when another process holds the fresh database's lock (several processes
    starting together on a new file: test_concurrent_startups_migrate_once failed ~1 run in 6)."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
