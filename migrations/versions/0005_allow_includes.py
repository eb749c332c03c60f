"""clients.allow_includes: whether a client may pass include[] other than uuid

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 02:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing clients keep what they could do before: includes were forwarded unchecked.
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("allow_includes", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.alter_column("allow_includes", server_default=sa.false())


def downgrade() -> None:
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.drop_column("allow_includes")
