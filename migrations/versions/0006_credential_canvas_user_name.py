"""credentials.canvas_user_name: the Canvas user a verified worker token belongs to

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 19:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: credentials stored before verification existed (or with --no-verify) have none.
    with op.batch_alter_table("credentials", schema=None) as batch_op:
        batch_op.add_column(sa.Column("canvas_user_name", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("credentials", schema=None) as batch_op:
        batch_op.drop_column("canvas_user_name")
