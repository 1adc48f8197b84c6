"""Penalties against repeating, per conversation (repetition, frequency and presence).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 15:50:00.000000
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Server defaults, so that the conversations already stored decode as before: without penalties.
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('repetition_penalty', sa.Float(), server_default='1.0', nullable=False))
        batch_op.add_column(sa.Column('frequency_penalty', sa.Float(), server_default='0.0', nullable=False))
        batch_op.add_column(sa.Column('presence_penalty', sa.Float(), server_default='0.0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_column('presence_penalty')
        batch_op.drop_column('frequency_penalty')
        batch_op.drop_column('repetition_penalty')
