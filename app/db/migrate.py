"""Programmatic Alembic: the migration scripts live in this package (app/db/migrations), no alembic.ini.

Later features add revisions to app/db/migrations/versions (one file each, ``down_revision`` = the
previous head), e.g. from a development checkout::

    python -c "from alembic import command; from app.db import alembic_config; \
command.revision(alembic_config('sqlite:///dev.db'), 'add alerts', autogenerate=True)"
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, event, text

from app.db.engine import make_engine

MIGRATIONS = Path(__file__).with_name("migrations")
_PG_LOCK_ID = 0x726D616D6261  # "rmamba": one migrator at a time on PostgreSQL
_LOCAL_LOCK = threading.Lock()  # Alembic's context is process-global: one migration per process at a time


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config pointing at our migration scripts (``url`` for the alembic CLI-style commands)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        cfg.attributes["url"] = url
    return cfg


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migration chain has {len(heads)} heads ({heads}); merge them")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_to_head(url_or_engine: str | Engine, *, schema: str | None = None) -> Engine:
    """Bring the database schema to the newest revision (idempotent, safe when several processes start at
    once); returns an engine for the application to use."""
    engine = make_engine(url_or_engine, schema=schema) if isinstance(url_or_engine, str) else url_or_engine
    _run_locked(engine, lambda cfg: command.upgrade(cfg, "head"))
    return engine


def _run_locked(engine: Engine, action) -> None:  # noqa: ANN001
    """Run an Alembic command in one transaction that holds the database's migration lock."""
    cfg = alembic_config()
    with _LOCAL_LOCK:
        if engine.dialect.name == "sqlite":
            engine = _sqlite_exclusive(engine)
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_ID})
                cfg.attributes["connection"] = conn
                action(cfg)
        finally:
            if engine.dialect.name == "sqlite":
                engine.dispose()


def _sqlite_exclusive(engine: Engine) -> Engine:
    """A separate SQLite engine whose transactions start with BEGIN IMMEDIATE and include DDL: the
    sqlite3 module would otherwise commit each CREATE TABLE on its own, and two migrators would race."""
    mig = make_engine(engine.url.render_as_string(hide_password=False))

    @event.listens_for(mig, "connect")
    def _manual(dbapi_conn, _rec) -> None:  # noqa: ANN001
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves

    @event.listens_for(mig, "begin")
    def _begin(conn) -> None:  # noqa: ANN001
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # takes the write lock; other migrators wait (busy timeout)

    return mig


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Undo migrations down to ``revision`` (tests and emergencies)."""
    _run_locked(engine, lambda cfg: command.downgrade(cfg, revision))
