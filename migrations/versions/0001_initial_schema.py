"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 16:15:11.934318
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('admin_keys',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('role', sa.String(length=20), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.Column('created_by', sa.String(length=40), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_admin_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_admin_keys_key_hash'))
    )
    op.create_table('audit_events',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('time', sa.DateTime(), nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('decision', sa.String(length=8), nullable=False),
    sa.Column('reason', sa.String(length=64), nullable=True),
    sa.Column('client_id', sa.String(length=40), nullable=True),
    sa.Column('token_id', sa.String(length=40), nullable=True),
    sa.Column('credential_id', sa.String(length=40), nullable=True),
    sa.Column('upstream', sa.String(length=100), nullable=True),
    sa.Column('actor_key_id', sa.String(length=40), nullable=True),
    sa.Column('source_ip', sa.String(length=64), nullable=True),
    sa.Column('user_agent', sa.String(length=500), nullable=True),
    sa.Column('method', sa.String(length=16), nullable=True),
    sa.Column('path', sa.Text(), nullable=True),
    sa.Column('query', sa.Text(), nullable=True),
    sa.Column('scope', sa.Text(), nullable=True),
    sa.Column('status', sa.Integer(), nullable=True),
    sa.Column('upstream_status', sa.Integer(), nullable=True),
    sa.Column('response_bytes', sa.BigInteger(), nullable=True),
    sa.Column('duration_ms', sa.Double(), nullable=True),
    sa.Column('canvas_context_id', sa.String(length=100), nullable=True),
    sa.Column('details', sa.JSON(), nullable=True),
    sa.Column('completed_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_audit_events'))
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index('ix_audit_events_client_seq', ['client_id', 'seq'], unique=False)
        batch_op.create_index('ix_audit_events_time', ['time'], unique=False)

    op.create_table('upstreams',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('base_url', sa.String(length=500), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_upstreams')),
    sa.UniqueConstraint('name', name=op.f('uq_upstreams_name'))
    )
    op.create_table('credentials',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('upstream_id', sa.String(length=40), nullable=False),
    sa.Column('token_ciphertext', sa.LargeBinary(), nullable=False),
    sa.Column('token_key_id', sa.String(length=40), nullable=False),
    sa.Column('token_last4', sa.String(length=4), nullable=False),
    sa.Column('canvas_user_id', sa.String(length=100), nullable=True),
    sa.Column('notes', sa.Text(), nullable=True),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('rotated_at', sa.DateTime(), nullable=True),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['upstream_id'], ['upstreams.id'], name=op.f('fk_credentials_upstream_id_upstreams')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_credentials')),
    sa.UniqueConstraint('name', name=op.f('uq_credentials_name'))
    )
    with op.batch_alter_table('credentials', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_credentials_upstream_id'), ['upstream_id'], unique=False)

    op.create_table('clients',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('credential_id', sa.String(length=40), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=False),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('constraints', sa.JSON(), nullable=False),
    sa.Column('token_ttl', sa.Integer(), nullable=False),
    sa.Column('max_token_ttl', sa.Integer(), nullable=False),
    sa.Column('allow_masquerade', sa.Boolean(), nullable=False),
    sa.Column('allowed_cidrs', sa.JSON(), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('grant_version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('secret_rotated_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['credential_id'], ['credentials.id'], name=op.f('fk_clients_credential_id_credentials')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_clients')),
    sa.UniqueConstraint('name', name=op.f('uq_clients_name'))
    )
    with op.batch_alter_table('clients', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_clients_credential_id'), ['credential_id'], unique=False)

    op.create_table('proxy_tokens',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('client_id', sa.String(length=40), nullable=False),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.Column('revoked_by', sa.String(length=100), nullable=True),
    sa.Column('source_ip', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['client_id'], ['clients.id'], name=op.f('fk_proxy_tokens_client_id_clients')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_proxy_tokens')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_proxy_tokens_token_hash'))
    )
    with op.batch_alter_table('proxy_tokens', schema=None) as batch_op:
        batch_op.create_index('ix_proxy_tokens_client_live', ['client_id', 'expires_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('proxy_tokens', schema=None) as batch_op:
        batch_op.drop_index('ix_proxy_tokens_client_live')

    op.drop_table('proxy_tokens')
    with op.batch_alter_table('clients', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_clients_credential_id'))

    op.drop_table('clients')
    with op.batch_alter_table('credentials', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_credentials_upstream_id'))

    op.drop_table('credentials')
    op.drop_table('upstreams')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_events_time')
        batch_op.drop_index('ix_audit_events_client_seq')

    op.drop_table('audit_events')
    op.drop_table('admin_keys')
