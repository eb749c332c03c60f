"""Workload identity: trust policies on clients, the issuer allowlist, used subject tokens

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 19:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing clients trust no workload identity.
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trust_policies", sa.JSON(), nullable=True))
    op.create_table(
        "trusted_issuers",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("issuer", sa.String(length=500), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trusted_issuers")),
        sa.UniqueConstraint("issuer", name=op.f("uq_trusted_issuers_issuer")),
    )
    op.create_table(
        "used_subject_tokens",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_used_subject_tokens")),
    )
    with op.batch_alter_table("used_subject_tokens", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_used_subject_tokens_expires_at"), ["expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("used_subject_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_used_subject_tokens_expires_at"))
    op.drop_table("used_subject_tokens")
    op.drop_table("trusted_issuers")
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.drop_column("trust_policies")
