"""private_key_jwt client authentication

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 17:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "auth_method", sa.String(length=32), server_default="client_secret", nullable=False
            )
        )
        batch_op.add_column(sa.Column("jwks", sa.JSON(), nullable=True))
        batch_op.alter_column("secret_hash", existing_type=sa.String(length=64), nullable=True)

    op.create_table(
        "used_assertions",
        sa.Column("client_id", sa.String(length=40), nullable=False),
        sa.Column("jti", sa.String(length=200), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["client_id"], ["clients.id"], name=op.f("fk_used_assertions_client_id_clients")
        ),
        sa.PrimaryKeyConstraint("client_id", "jti", name=op.f("pk_used_assertions")),
    )


def downgrade() -> None:
    op.drop_table("used_assertions")
    # Clients without a secret cannot survive a downgrade; refuse rather than lose them.
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.alter_column("secret_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.drop_column("jwks")
        batch_op.drop_column("auth_method")
