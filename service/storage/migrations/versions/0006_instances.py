"""Liveness of service processes: an ``instances`` row per process, and the owner of each pending key.

A pending key whose owner stopped its heartbeat (it died) can be claimed again at once instead of after
``claim_stale_s``. Keys pending before this revision have no owner: only their age frees them.

Revision ID: 0006_instances
Revises: 0005_idempotency_claims
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_instances"
down_revision = "0005_idempotency_claims"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("alive_until", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("owner", sa.String(32)))


def downgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_column("owner")
    op.drop_table("instances")
