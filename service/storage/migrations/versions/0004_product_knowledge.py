"""Product knowledge: reference images, normal memories, calibrations; review zone, fusion weight and versions.

Revision ID: 0004_product_knowledge
Revises: 0003_reviews
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_product_knowledge"
down_revision = "0003_reviews"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("products") as batch:
        batch.add_column(sa.Column("review_threshold", sa.Float))
        batch.add_column(sa.Column("fusion_weight", sa.Float, nullable=False, server_default="0.5"))
        batch.add_column(sa.Column("memory_version", sa.String(16)))
        batch.add_column(sa.Column("calibration_version", sa.String(16)))
        batch.add_column(sa.Column("pixel_good_level", sa.Float))
    with op.batch_alter_table("inspections") as batch:
        batch.add_column(sa.Column("memory_version", sa.String(16)))
        batch.add_column(sa.Column("calibration_version", sa.String(16)))
    op.create_table(
        "reference_images",
        sa.Column("id", sa.String(28), primary_key=True),
        sa.Column("product", sa.String(200), nullable=False),
        sa.Column("filename", sa.String(1000), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("nbytes", sa.Integer, nullable=False),
        sa.Column("model_key", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_reference_images_product", "reference_images", ["product"])
    op.create_table(
        "memories",
        sa.Column("version", sa.String(16), primary_key=True),
        sa.Column("product", sa.String(200), nullable=False),
        sa.Column("model_key", sa.String(64), nullable=False),
        sa.Column("n_references", sa.Integer, nullable=False),
        sa.Column("tokens", sa.Integer, nullable=False),
        sa.Column("nbytes", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_memories_product", "memories", ["product"])
    op.create_table(
        "calibrations",
        sa.Column("version", sa.String(16), primary_key=True),
        sa.Column("product", sa.String(200), nullable=False),
        sa.Column("memory_version", sa.String(16)),
        sa.Column("content", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_calibrations_product", "calibrations", ["product"])


def downgrade() -> None:
    op.drop_table("calibrations")
    op.drop_table("memories")
    op.drop_table("reference_images")
    with op.batch_alter_table("inspections") as batch:
        batch.drop_column("calibration_version")
        batch.drop_column("memory_version")
    with op.batch_alter_table("products") as batch:
        batch.drop_column("pixel_good_level")
        batch.drop_column("calibration_version")
        batch.drop_column("memory_version")
        batch.drop_column("fusion_weight")
        batch.drop_column("review_threshold")
