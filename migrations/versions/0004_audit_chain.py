"""tamper-evident audit chain, retention checkpoints, revocation epoch

Events written before this revision have no MAC; ``broker init`` seals them into the chain
with the keyring (a migration has no keys), and until then the audit writer refuses to
append, so nothing is forwarded unaudited.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 09:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_events_time")
        batch_op.drop_index("ix_audit_events_client_seq")
        batch_op.add_column(sa.Column("completes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("prev_mac", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("mac", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("mac_key", sa.String(length=40), nullable=True))
        batch_op.create_index(
            "ix_audit_events_completes",
            ["completes"],
            unique=False,
            sqlite_where=sa.text("completes IS NOT NULL"),
            postgresql_where=sa.text("completes IS NOT NULL"),
        )
        # Review filters never look for completion events by time or client.
        batch_op.create_index(
            "ix_audit_events_time",
            ["time"],
            unique=False,
            sqlite_where=sa.text("completes IS NULL"),
            postgresql_where=sa.text("completes IS NULL"),
        )
        batch_op.create_index(
            "ix_audit_events_client_seq",
            ["client_id", "seq"],
            unique=False,
            sqlite_where=sa.text("client_id IS NOT NULL"),
            postgresql_where=sa.text("client_id IS NOT NULL"),
        )

    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_mac", sa.String(length=64), nullable=False),
        sa.Column("mac_key", sa.String(length=40), nullable=True),
        sa.Column("mac", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("through_seq", sa.BigInteger(), nullable=False),
        sa.Column("through_mac", sa.String(length=64), nullable=False),
        sa.Column("events_pruned", sa.BigInteger(), nullable=False),
        sa.Column("incomplete_pruned", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("mac_key", sa.String(length=40), nullable=False),
        sa.Column("mac", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_checkpoints")),
    )
    epoch = op.create_table(
        "revocation_epoch",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_revocation_epoch")),
    )
    op.bulk_insert(epoch, [{"id": 1, "epoch": 0}])


def downgrade() -> None:
    op.drop_table("revocation_epoch")
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_head")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_events_client_seq")
        batch_op.drop_index("ix_audit_events_time")
        batch_op.create_index("ix_audit_events_time", ["time"], unique=False)
        batch_op.create_index("ix_audit_events_client_seq", ["client_id", "seq"], unique=False)
        batch_op.drop_index("ix_audit_events_completes")
        batch_op.drop_column("mac_key")
        batch_op.drop_column("mac")
        batch_op.drop_column("prev_mac")
        batch_op.drop_column("completes")
