"""The two databases every storage, migration and API test runs on, and the guard that the PostgreSQL half ran.

``database_url`` is parametrised ``sqlite`` / ``postgresql``. The SQLite variant is a fresh file under the test's
tmp folder. The PostgreSQL variant needs ``DHR_TEST_POSTGRES_URL`` (a server where that user may create databases;
``.ci/run`` starts one): each pytest session creates its own database there (dropped at the end, so concurrent
sessions never meet) and every test gets it with its ``public`` schema dropped and re-created, so it starts from
nothing. Without the variable the PostgreSQL variant is skipped.

The guard: when ``DHR_TEST_POSTGRES_URL`` is set and a database-parametrised test ran on SQLite but none on
PostgreSQL (a skip crept in, a fixture stopped using the URL), the session fails with one line saying so. This
module is a pytest plugin (loaded by ``tests/conftest.py``).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

POSTGRES_ENV = "DHR_TEST_POSTGRES_URL"
DATABASES = ("sqlite", "postgresql")
RAN = pytest.StashKey[dict[str, int]]()
SESSION_DB = pytest.StashKey[str]()


def postgres_url() -> str | None:
    return os.environ.get(POSTGRES_ENV) or None


def _admin(sql: str, url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def session_postgres_url(config: pytest.Config, base_url: str) -> str:
    """A database of this pytest session on the server of ``base_url``, created on first use, dropped at exit."""
    if SESSION_DB not in config.stash:
        from sqlalchemy.engine import make_url

        name = f"dhr_test_{os.getpid()}_{secrets.token_hex(3)}"
        _admin(f'CREATE DATABASE "{name}"', base_url)
        config.add_cleanup(lambda: _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', base_url))
        config.stash[SESSION_DB] = make_url(base_url).set(database=name).render_as_string(hide_password=False)
    return config.stash[SESSION_DB]


def reset_postgres(url: str) -> None:
    """Drop every table, sequence and type of the database's ``public`` schema."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


def fresh_database_url(kind: str, folder: Path, config: pytest.Config) -> str:
    """A URL of an empty database of ``kind`` (``sqlite``: a file in ``folder``); skips PostgreSQL when unset.

    Counts the databases handed out in ``config.stash`` for the guard below.
    """
    ran = config.stash.setdefault(RAN, {"sqlite": 0, "postgresql": 0})
    if kind == "sqlite":
        ran["sqlite"] += 1
        (folder / "db").mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'db' / 'inspections.db'}"
    base_url = postgres_url()
    if base_url is None:
        pytest.skip(f"{POSTGRES_ENV} not set")
    url = session_postgres_url(config, base_url)
    reset_postgres(url)
    ran["postgresql"] += 1
    return url


@pytest.fixture(params=DATABASES)
def database_url(request, tmp_path: Path) -> str:
    """An empty database, once SQLite and once PostgreSQL."""
    return fresh_database_url(request.param, tmp_path, request.config)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    ran = session.config.stash.get(RAN, {"sqlite": 0, "postgresql": 0})
    if postgres_url() is None or ran["sqlite"] == 0 or ran["postgresql"] > 0:
        return
    line = f"{POSTGRES_ENV} is set but no test ran on PostgreSQL ({ran['sqlite']} database tests ran on SQLite only)"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(f"FAILED: {line}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
