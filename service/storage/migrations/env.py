"""Alembic environment: migrations run on the connection that ``service.storage.schema`` hands over.

``upgrade_database`` opens the transaction and takes the migration lock, then passes the connection in
``config.attributes["connection"]``; this script only configures the context on it. For ad-hoc use of the
``alembic`` command (e.g. ``alembic revision``), ``sqlalchemy.url`` in the config names the database instead.
"""

from alembic import context
from sqlalchemy import create_engine

from service.storage.models import Base

config = context.config


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copy-and-move
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()
