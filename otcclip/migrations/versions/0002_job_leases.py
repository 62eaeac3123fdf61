"""job and shard leases

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_owner', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('recoveries', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('recoveries', server_default=None)
    with op.batch_alter_table('job_shards', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_owner', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('job_shards', schema=None) as batch_op:
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('lease_owner')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('recoveries')
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('lease_owner')
