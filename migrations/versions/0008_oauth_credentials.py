"""OAuth worker credentials: a developer key and refresh token per credential, and the
authorisations in progress

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 11:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every existing credential is a manual token, usable as before.
    with op.batch_alter_table("credentials", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="manual")
        )
        batch_op.add_column(sa.Column("token_expires_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("unavailable_reason", sa.String(length=64), nullable=True))
    op.create_table(
        "credential_oauth",
        sa.Column("credential_id", sa.String(length=40), nullable=False),
        sa.Column("developer_key_id", sa.String(length=100), nullable=False),
        sa.Column("secret_ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("secret_key_id", sa.String(length=40), nullable=False),
        sa.Column("refresh_ciphertext", sa.LargeBinary(), nullable=True),
        sa.Column("refresh_key_id", sa.String(length=40), nullable=True),
        sa.Column("key_scopes", sa.JSON(), nullable=True),
        sa.Column("authorized_at", sa.DateTime(), nullable=True),
        sa.Column("refreshed_at", sa.DateTime(), nullable=True),
        sa.Column("refresh_due_at", sa.DateTime(), nullable=True),
        sa.Column("refresh_error", sa.String(length=255), nullable=True),
        sa.Column("lease_holder", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["credential_id"],
            ["credentials.id"],
            name=op.f("fk_credential_oauth_credential_id_credentials"),
        ),
        sa.PrimaryKeyConstraint("credential_id", name=op.f("pk_credential_oauth")),
    )
    op.create_table(
        "oauth_states",
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("credential_id", sa.String(length=40), nullable=False),
        sa.Column("verifier_ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("verifier_key_id", sa.String(length=40), nullable=False),
        sa.Column("redirect_uri", sa.String(length=500), nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["credential_id"],
            ["credentials.id"],
            name=op.f("fk_oauth_states_credential_id_credentials"),
        ),
        sa.PrimaryKeyConstraint("state_hash", name=op.f("pk_oauth_states")),
    )
    with op.batch_alter_table("oauth_states", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_oauth_states_credential_id"), ["credential_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("oauth_states", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_oauth_states_credential_id"))
    op.drop_table("oauth_states")
    op.drop_table("credential_oauth")
    with op.batch_alter_table("credentials", schema=None) as batch_op:
        batch_op.drop_column("unavailable_reason")
        batch_op.drop_column("token_expires_at")
        batch_op.drop_column("kind")
