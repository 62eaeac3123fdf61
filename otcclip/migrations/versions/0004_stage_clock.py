"""The job's stage clock: when the current stage started and its progress then

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stage_started_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('stage_start_done', sa.BigInteger(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('stage_start_done')
        batch_op.drop_column('stage_started_at')
