"""canvas_demand: each process's demand on a credential's Canvas bucket, shared by every
process and replica

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 19:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows live a few seconds and are rewritten by their process: nothing to carry over.
    op.create_table(
        "canvas_demand",
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("credential_id", sa.String(length=40), nullable=False),
        sa.Column("client_id", sa.String(length=40), nullable=False),
        sa.Column("weight", sa.Double(), nullable=False),
        sa.Column("asked", sa.Double(), nullable=False),
        sa.Column("spent", sa.Double(), nullable=False),
        sa.Column("spent_total", sa.Double(), nullable=False),
        sa.Column("in_flight", sa.Integer(), nullable=False),
        sa.Column("asking", sa.Boolean(), nullable=False),
        sa.Column("remaining", sa.Double(), nullable=True),
        sa.Column("seen_at", sa.Double(), nullable=True),
        sa.Column("ceiling", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint(
            "holder", "credential_id", "client_id", name=op.f("pk_canvas_demand")
        ),
    )
    with op.batch_alter_table("canvas_demand", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_canvas_demand_updated_at"), ["updated_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("canvas_demand", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_canvas_demand_updated_at"))
    op.drop_table("canvas_demand")
