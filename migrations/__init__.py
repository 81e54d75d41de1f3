"""Alembic migrations for the envclone state database (run via shared.migrate)."""
