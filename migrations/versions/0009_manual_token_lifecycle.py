"""Manual tokens with a lifecycle: the token's Canvas record (id, purpose) and a rotation
schedule, with its lease

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing credentials: nothing known about their Canvas record, no schedule.
    with op.batch_alter_table("credentials", schema=None) as batch_op:
        batch_op.add_column(sa.Column("token_purpose", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("canvas_token_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("rotate_every", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("rotate_due_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("rotate_error", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("rotate_lease_holder", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("rotate_lease_until", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("credentials", schema=None) as batch_op:
        batch_op.drop_column("rotate_lease_until")
        batch_op.drop_column("rotate_lease_holder")
        batch_op.drop_column("rotate_error")
        batch_op.drop_column("rotate_due_at")
        batch_op.drop_column("rotate_every")
        batch_op.drop_column("canvas_token_id")
        batch_op.drop_column("token_purpose")
