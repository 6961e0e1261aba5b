"""Alembic environment: runs on the connection handed in by app.db.migrate (or a URL, for the CLI)."""

from __future__ import annotations

from alembic import context

from app.db.engine import make_engine
from app.db.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:  # noqa: ANN001
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTER goes through table copies
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    context.configure(url=config.attributes.get("url") or "sqlite://", target_metadata=target_metadata,
                      literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.attributes.get("url")
    if not url:
        raise ValueError("no connection or url given to the migration environment (see app/db/migrate.py)")
    with make_engine(url).begin() as conn:
        _run(conn)


if context.is_offline_mode():
    run_offline()
else:
    run_online()
