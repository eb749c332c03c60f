"""per-client rate limits

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('clients', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rate_limit', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('rate_burst', sa.Integer(), nullable=True))

    op.create_table('rate_buckets',
    sa.Column('client_id', sa.String(length=40), nullable=False),
    sa.Column('tokens', sa.Double(), nullable=False),
    sa.Column('updated_at', sa.Double(), nullable=False),
    sa.ForeignKeyConstraint(['client_id'], ['clients.id'], name=op.f('fk_rate_buckets_client_id_clients'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('client_id', name=op.f('pk_rate_buckets'))
    )


def downgrade() -> None:
    op.drop_table('rate_buckets')
    with op.batch_alter_table('clients', schema=None) as batch_op:
        batch_op.drop_column('rate_burst')
        batch_op.drop_column('rate_limit')
