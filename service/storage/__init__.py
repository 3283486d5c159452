"""Inspection storage: records in SQL (SQLite WAL by default, PostgreSQL by URL); artefacts in a
folder or an S3 bucket (``artefacts.py``).

Schema changes go through Alembic migrations in ``service/storage/migrations/versions/``; the store upgrades the
database in place when it opens (``schema.upgrade_database``). To add a migration:

1. Change the ORM tables in ``models.py``.
2. Add ``versions/NNNN_<what>.py`` (next number) with ``revision = "NNNN_<what>"`` and ``down_revision`` set to
   the current head (``python -c "from service.storage.schema import head_revision; print(head_revision())"``),
   and ``upgrade()`` / ``downgrade()`` written with ``alembic.op``. There is exactly one head: after a rebase onto
   someone else's migration, point your ``down_revision`` at theirs.
3. New columns on existing tables need a ``server_default`` (or be nullable) so existing rows stay valid; on
   SQLite, alter or drop columns inside ``with op.batch_alter_table(...)``.
4. ``tests/test_migrations.py`` checks that an upgraded database matches ``models.py`` exactly (SQLite always,
   PostgreSQL with ``DHR_TEST_POSTGRES_URL``) and that a first-release database upgrades with its records intact.
"""

from service.storage.artefacts import ArtefactStore, open_artefact_store
from service.storage.models import InspectionRecord, ProductProfile, new_inspection_id
from service.storage.store import InspectionStore, StorageUnavailableError, open_store

__all__ = [
    "ArtefactStore",
    "InspectionRecord",
    "InspectionStore",
    "ProductProfile",
    "StorageUnavailableError",
    "new_inspection_id",
    "open_artefact_store",
    "open_store",
]
