"""Alembic migration environment of the application database (see app/db/migrate.py)."""
