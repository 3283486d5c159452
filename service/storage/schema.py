"""Database schema by Alembic migration: every store upgrades its database to the head revision when it opens.

``upgrade_database(engine)`` runs under a lock and in one transaction, so replicas starting together migrate once:
PostgreSQL takes a transaction-scoped advisory lock (DDL is transactional there); a SQLite file is migrated on a
connection that starts with ``BEGIN IMMEDIATE`` (the write lock; the others wait up to the busy timeout).

A database created by the first release has the baseline tables but no ``alembic_version`` table (that release
ran ``Base.metadata.create_all``). It is recognised by its tables, checked column by column against the baseline
(anything else is refused rather than guessed at), stamped at the baseline revision and upgraded from there.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.pool import NullPool

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
BASELINE_REVISION = "0001_baseline"
# Columns of the first release's tables, the ones a database without ``alembic_version`` must have.
BASELINE_COLUMNS = {
    "inspections": {
        "id", "created_at", "product", "line", "part_id", "filename", "width", "height", "score", "threshold",
        "verdict", "image_score", "pixel_threshold", "defect_area_ratio", "regions", "model", "timing_ms",
        "artefacts",
    },
    "products": {"name", "image_threshold", "pixel_threshold", "image_score", "updated_at"},
}  # fmt: skip
_PG_LOCK_KEY = 0x44485243_4C495031 & 0x7FFFFFFFFFFFFFFF  # "DHRCLIP1": one advisory lock for schema changes


def alembic_config() -> Config:
    """Alembic configuration pointing at this package's migration scripts (no ini file needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    """The single head of the migration chain (more than one head is a packaging error)."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migration scripts must have exactly one head, found {sorted(heads)}")
    return heads[0]


def current_revision(connection: Connection) -> str | None:
    """Revision the database is stamped with, or None when it has no ``alembic_version`` table."""
    return MigrationContext.configure(connection).get_current_revision()


def _check_baseline(connection: Connection, tables: set[str]) -> None:
    """Refuse an unversioned database whose tables are not exactly the first release's (named in the error)."""
    inspector = inspect(connection)
    for table, expected in BASELINE_COLUMNS.items():
        if table not in tables:
            raise RuntimeError(f"unversioned database lacks table {table!r}; it was not made by this service")
        found = {c["name"] for c in inspector.get_columns(table)}
        if found != expected:
            raise RuntimeError(
                f"unversioned database: table {table!r} is not the first release's schema "
                f"(missing {sorted(expected - found)}, unexpected {sorted(found - expected)})"
            )


def _migrate(connection: Connection) -> str:
    tables = set(inspect(connection).get_table_names())
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    if "alembic_version" not in tables and tables & set(BASELINE_COLUMNS):
        _check_baseline(connection, tables)
        command.stamp(cfg, BASELINE_REVISION)
    command.upgrade(cfg, "head")
    return current_revision(connection)


def _locked_sqlite_engine(engine: Engine) -> Engine:
    """A one-connection engine on the same SQLite file whose transactions start with ``BEGIN IMMEDIATE``.

    pysqlite would otherwise commit DDL statement by statement; with the driver's own transaction handling off,
    the whole migration is one SQLite transaction holding the write lock from its start.
    """
    locked = create_engine(engine.url, poolclass=NullPool, connect_args={"timeout": 30})

    @event.listens_for(locked, "connect")
    def _autocommit_driver(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")

    @event.listens_for(locked, "begin")
    def _begin_immediate(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return locked


def upgrade_database(engine: Engine) -> str:
    """Bring the database behind ``engine`` to the head revision in place; returns that revision.

    An empty database gets every table; an up-to-date one is left alone; a first-release one is stamped at the
    baseline first. Raises RuntimeError for an unversioned database that is not the first release's.
    """
    head_revision()  # fail early on a broken chain
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        locked = _locked_sqlite_engine(engine)
        try:
            with locked.begin() as connection:
                return _migrate(connection)
        finally:
            locked.dispose()
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
        return _migrate(connection)
