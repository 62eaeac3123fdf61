"""Rows done of a running shard (the job's progress within a shard)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job_shards', schema=None) as batch_op:
        batch_op.add_column(sa.Column('progress_done', sa.BigInteger(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('job_shards', schema=None) as batch_op:
        batch_op.drop_column('progress_done')
