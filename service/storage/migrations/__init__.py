"""Alembic migration scripts of the inspection store (see ``service.storage`` for how to add one)."""
