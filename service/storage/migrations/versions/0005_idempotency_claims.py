"""Idempotency keys claimed in the database: a pending row while a request holds its key, on every replica.

Existing keys were committed with their inspections, so they are ``done``.

Revision ID: 0005_idempotency_claims
Revises: 0004_product_knowledge
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_idempotency_claims"
down_revision = "0004_product_knowledge"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("state", sa.String(8), nullable=False, server_default="done"))
        batch.add_column(sa.Column("claim", sa.String(32)))


def downgrade() -> None:
    op.execute("DELETE FROM idempotency_keys WHERE state = 'pending'")
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_column("claim")
        batch.drop_column("state")
