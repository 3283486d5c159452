"""Baseline: the schema of the first release (tables ``inspections`` and ``products``).

A database created by that release (``Base.metadata.create_all``, no ``alembic_version`` table) is stamped at
this revision by ``service.storage.schema.upgrade_database`` and then upgraded like any other.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", sa.String(28), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("product", sa.String(200)),
        sa.Column("line", sa.String(200)),
        sa.Column("part_id", sa.String(200)),
        sa.Column("filename", sa.String(1000)),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("verdict", sa.String(8), nullable=False),
        sa.Column("image_score", sa.String(64), nullable=False),
        sa.Column("pixel_threshold", sa.Float, nullable=False),
        sa.Column("defect_area_ratio", sa.Float, nullable=False),
        sa.Column("regions", sa.JSON, nullable=False),
        sa.Column("model", sa.JSON, nullable=False),
        sa.Column("timing_ms", sa.JSON, nullable=False),
        sa.Column("artefacts", sa.JSON, nullable=False),
    )
    op.create_index("ix_inspections_created_id", "inspections", ["created_at", "id"])
    op.create_index("ix_inspections_product", "inspections", ["product"])
    op.create_index("ix_inspections_line", "inspections", ["line"])
    op.create_index("ix_inspections_verdict", "inspections", ["verdict"])
    op.create_table(
        "products",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("image_threshold", sa.Float, nullable=False),
        sa.Column("pixel_threshold", sa.Float, nullable=False),
        sa.Column("image_score", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("products")
    op.drop_table("inspections")
