"""The application database: engine, schema migrations (Alembic) and the repositories of each feature.

SQLite (a file, WAL mode) by default; PostgreSQL through ``postgresql+psycopg://``. The schema is owned
by the migrations in app/db/migrations/versions; `upgrade_to_head` runs them on startup.
"""

from app.db.engine import make_engine
from app.db.migrate import alembic_config, current_revision, head_revision, upgrade_to_head

__all__ = ["alembic_config", "current_revision", "head_revision", "make_engine", "upgrade_to_head"]
