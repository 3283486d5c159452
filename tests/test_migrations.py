"""Schema migrations: a fresh database equals ``models.py``; a first-release database upgrades with records intact.

The first release made its tables with ``Base.metadata.create_all`` and had no ``alembic_version`` table. Its DDL
is frozen below exactly as that release emitted it (SQLite and PostgreSQL), and its rows are written with raw SQL
in that release's storage formats, so this test keeps checking the real upgrade path however ``models.py`` grows.
Every test taking ``db_url`` runs on SQLite and on PostgreSQL (``database_url`` of tests/databases.py).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from service.storage import InspectionStore
from service.storage.models import Base
from service.storage.schema import BASELINE_REVISION, head_revision

FIRST_RELEASE_DDL = {
    "sqlite": """
CREATE TABLE inspections (
    id VARCHAR(28) NOT NULL, created_at DATETIME NOT NULL, product VARCHAR(200), line VARCHAR(200),
    part_id VARCHAR(200), filename VARCHAR(1000), width INTEGER NOT NULL, height INTEGER NOT NULL,
    score FLOAT NOT NULL, threshold FLOAT NOT NULL, verdict VARCHAR(8) NOT NULL, image_score VARCHAR(64) NOT NULL,
    pixel_threshold FLOAT NOT NULL, defect_area_ratio FLOAT NOT NULL, regions JSON NOT NULL, model JSON NOT NULL,
    timing_ms JSON NOT NULL, artefacts JSON NOT NULL, PRIMARY KEY (id));
CREATE INDEX ix_inspections_created_id ON inspections (created_at, id);
CREATE INDEX ix_inspections_product ON inspections (product);
CREATE INDEX ix_inspections_verdict ON inspections (verdict);
CREATE INDEX ix_inspections_line ON inspections (line);
CREATE TABLE products (
    name VARCHAR(200) NOT NULL, image_threshold FLOAT NOT NULL, pixel_threshold FLOAT NOT NULL,
    image_score VARCHAR(64) NOT NULL, updated_at DATETIME NOT NULL, PRIMARY KEY (name))
""",
    "postgresql": """
CREATE TABLE inspections (
    id character varying(28) NOT NULL, created_at timestamp with time zone NOT NULL,
    product character varying(200), line character varying(200), part_id character varying(200),
    filename character varying(1000), width integer NOT NULL, height integer NOT NULL,
    score double precision NOT NULL, threshold double precision NOT NULL, verdict character varying(8) NOT NULL,
    image_score character varying(64) NOT NULL, pixel_threshold double precision NOT NULL,
    defect_area_ratio double precision NOT NULL, regions json NOT NULL, model json NOT NULL,
    timing_ms json NOT NULL, artefacts json NOT NULL, CONSTRAINT inspections_pkey PRIMARY KEY (id));
CREATE INDEX ix_inspections_created_id ON inspections USING btree (created_at, id);
CREATE INDEX ix_inspections_line ON inspections USING btree (line);
CREATE INDEX ix_inspections_product ON inspections USING btree (product);
CREATE INDEX ix_inspections_verdict ON inspections USING btree (verdict);
CREATE TABLE products (
    name character varying(200) NOT NULL, image_threshold double precision NOT NULL,
    pixel_threshold double precision NOT NULL, image_score character varying(64) NOT NULL,
    updated_at timestamp with time zone NOT NULL, CONSTRAINT products_pkey PRIMARY KEY (name))
""",
}

T1 = datetime(2024, 3, 10, 12, 0, 0, 123456, tzinfo=UTC)
T2 = datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
ROWS = [
    {
        "id": "018e2a8f3b1b0123456789abcdef",
        "created_at": T1,
        "product": "bottle",
        "line": "L1",
        "part_id": "P-1",
        "filename": "a.png",
        "width": 640,
        "height": 480,
        "score": 0.8125,
        "threshold": 0.5,
        "verdict": "defect",
        "image_score": "max",
        "pixel_threshold": 0.45,
        "defect_area_ratio": 0.0123,
        "regions": '[{"bbox": [1, 2, 3, 4], "area": 12, "max_score": 0.9}]',
        "model": '{"backbone": "ViT-L-14-336"}',
        "timing_ms": '{"model": 40.25}',
        "artefacts": '["heatmap"]',
    },
    {
        "id": "019420d1f2a5fedcba9876543210",
        "created_at": T2,
        "product": None,
        "line": None,
        "part_id": None,
        "filename": None,
        "width": 1,
        "height": 2,
        "score": 0.25,
        "threshold": 0.5,
        "verdict": "ok",
        "image_score": "mean_max",
        "pixel_threshold": 0.5,
        "defect_area_ratio": 0.0,
        "regions": "[]",
        "model": "{}",
        "timing_ms": "{}",
        "artefacts": "[]",
    },
]


def _sqlite_time(value: datetime) -> str:
    """How the first release stored a datetime in SQLite: naive UTC text with microseconds."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


@pytest.fixture
def db_url(database_url: str) -> str:
    """An empty database: SQLite, and PostgreSQL when DHR_TEST_POSTGRES_URL is set."""
    return database_url


def _schema_diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()


def _version(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))]
    finally:
        engine.dispose()


def _write_first_release(url: str) -> None:
    engine = create_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    with engine.begin() as conn:
        for statement in FIRST_RELEASE_DDL[engine.dialect.name].split(";"):
            conn.execute(text(statement))
        columns = ", ".join(ROWS[0])
        values = ", ".join(f":{name}" for name in ROWS[0])
        for row in ROWS:
            row = {**row, "created_at": _sqlite_time(row["created_at"]) if sqlite else row["created_at"]}
            conn.execute(text(f"INSERT INTO inspections ({columns}) VALUES ({values})"), row)
        conn.execute(
            text("INSERT INTO products VALUES ('bottle', 0.625, 0.5, 'max', :at)"),
            {"at": _sqlite_time(T2) if sqlite else T2},
        )
    engine.dispose()


def test_fresh_database_is_at_head_and_matches_models(db_url, tmp_path):
    with InspectionStore(db_url, tmp_path / "art") as store:
        assert store.schema_revision == head_revision()
    assert _version(db_url) == [head_revision()]
    assert _schema_diff(db_url) == []
    with InspectionStore(db_url, tmp_path / "art") as store:  # reopening is a no-op
        assert store.count() == 0
    assert _version(db_url) == [head_revision()]


def test_first_release_database_upgrades_with_records_intact(db_url, tmp_path):
    _write_first_release(db_url)
    (tmp_path / "art" / "2024" / "03" / "10" / ROWS[0]["id"]).mkdir(parents=True)
    (tmp_path / "art" / "2024" / "03" / "10" / ROWS[0]["id"] / "heatmap.png").write_bytes(b"\x89PNG old")

    with InspectionStore(db_url, tmp_path / "art") as store:
        assert store.schema_revision == head_revision()
        assert store.count() == 2
        records, cursor = store.list()
        assert cursor is None
        assert [r.id for r in records] == [ROWS[1]["id"], ROWS[0]["id"]]  # newest first
        first = store.get(ROWS[0]["id"])
        assert (first.created_at, first.product, first.line, first.part_id) == (T1, "bottle", "L1", "P-1")
        assert (first.width, first.height, first.score, first.verdict) == (640, 480, 0.8125, "defect")
        assert (first.image_score, first.pixel_threshold, first.defect_area_ratio) == ("max", 0.45, 0.0123)
        assert first.regions == [{"bbox": [1, 2, 3, 4], "area": 12, "max_score": 0.9}]
        assert (first.model, first.timing_ms, first.artefacts) == (
            {"backbone": "ViT-L-14-336"},
            {"model": 40.25},
            ["heatmap"],
        )
        assert store.read_artefact(ROWS[0]["id"], "heatmap") == b"\x89PNG old"  # the old layout, read through
        second = store.get(ROWS[1]["id"])
        assert (second.created_at, second.product, second.regions, second.artefacts) == (T2, None, [], [])
        product = store.get_product("bottle")
        assert (product.image_threshold, product.pixel_threshold, product.image_score) == (0.625, 0.5, "max")
        assert product.updated_at == T2
        assert (product.fusion_weight, product.review_threshold, product.memory_version) == (0.5, None, None)
        assert (first.memory_version, first.calibration_version) == (None, None)
    assert _version(db_url) == [head_revision()]
    assert _schema_diff(db_url) == []


def test_unversioned_database_of_another_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE inspections (id VARCHAR(28) PRIMARY KEY, note TEXT)"))
        conn.execute(text("CREATE TABLE products (name VARCHAR(200) PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(RuntimeError, match=r"table 'inspections' is not the first release's schema .*'note'"):
        InspectionStore(url, tmp_path / "art")
    engine = create_engine(url)
    with engine.connect() as conn:  # nothing was stamped or created
        names = {r[0] for r in conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))}
    engine.dispose()
    assert names == {"inspections", "products"}


def test_replicas_opening_a_first_release_database_together_migrate_once(db_url, tmp_path):
    _write_first_release(db_url)
    results, errors = [], []

    def open_store() -> None:
        try:
            with InspectionStore(db_url, tmp_path / "art") as store:
                results.append((store.schema_revision, store.count()))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [(head_revision(), 2)] * 3
    assert _version(db_url) == [head_revision()]


def test_baseline_is_the_root_of_a_single_chain():
    from alembic.script import ScriptDirectory

    from service.storage.schema import alembic_config

    scripts = ScriptDirectory.from_config(alembic_config())
    assert scripts.get_bases() == [BASELINE_REVISION]
    assert scripts.get_heads() == [head_revision()]
