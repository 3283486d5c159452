"""Reviews of inspections (own table: who, when, decision, note) and the console's per-verdict/product/line indexes.

The three ``(column, created_at, id)`` indexes let "newest N of a verdict / product / line" and "oldest unreviewed
defects" read an index range in order instead of sorting every matching row (bench/console.py).

Revision ID: 0003_reviews
Revises: 0002_idempotency_keys
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_reviews"
down_revision = "0002_idempotency_keys"
branch_labels = None
depends_on = None

_INDEXES = {
    "ix_inspections_verdict_created": ["verdict", "created_at", "id"],
    "ix_inspections_product_created": ["product", "created_at", "id"],
    "ix_inspections_line_created": ["line", "created_at", "id"],
}


def upgrade() -> None:
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("inspection_id", sa.String(28), sa.ForeignKey("inspections.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decision", sa.String(32), nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("reviewer", sa.String(100), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(16)),
        sa.Column("reference_id", sa.String(64)),
    )
    op.create_index("ix_reviews_inspection_id", "reviews", ["inspection_id"])
    op.create_index("ix_reviews_decision", "reviews", ["decision"])
    for name, columns in _INDEXES.items():
        op.create_index(name, "inspections", columns)


def downgrade() -> None:
    for name in _INDEXES:
        op.drop_index(name, table_name="inspections")
    op.drop_table("reviews")
