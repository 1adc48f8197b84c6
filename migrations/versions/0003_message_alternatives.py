"""Messages get a random public id, and answers keep their alternatives (parent_id, selected).

The integer ``id`` stays as the internal order of a conversation's messages; clients see
``public_id`` from now on. Every regenerated answer points to the user message it answers
(``parent_id``); ``selected`` marks the one shown and used in the next prompt. Existing rows get
random public ids and are all selected, each answer pointing to the user message before it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 15:40:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


# Rebuilding the table (SQLite's batch mode) must keep AUTOINCREMENT: ids of deleted messages are
# never reused.
TABLE_KWARGS = {"sqlite_autoincrement": True}


def upgrade() -> None:
    op.add_column('messages', sa.Column('public_id', sa.String(length=32), nullable=True))
    # 16 random bytes as 32 hex digits, as app.db.models.new_id makes them.
    random_hex = {"sqlite": "lower(hex(randomblob(16)))",
                  "postgresql": "replace(gen_random_uuid()::text, '-', '')"}[op.get_bind().dialect.name]
    op.execute(f"UPDATE messages SET public_id = {random_hex}")
    # The rebuild copies the rows into a new table and drops the old one; SQLite's drop deletes its
    # rows first, which an ON DELETE CASCADE pointing at "messages" would carry into the copy. So
    # parent_id is filled only after the rebuild, while it is still NULL everywhere.
    with op.batch_alter_table('messages', schema=None, table_kwargs=TABLE_KWARGS) as batch_op:
        batch_op.add_column(sa.Column('parent_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('selected', sa.Boolean(), server_default=sa.true(), nullable=False))
        batch_op.alter_column('public_id', existing_type=sa.String(length=32), nullable=False)
        batch_op.create_index(batch_op.f('ix_messages_public_id'), ['public_id'], unique=True)
        batch_op.create_index(batch_op.f('ix_messages_parent_id'), ['parent_id'], unique=False)
        batch_op.create_foreign_key('fk_messages_parent_id_messages', 'messages', ['parent_id'], ['id'],
                                    ondelete='CASCADE')
    op.execute(
        "UPDATE messages SET parent_id = (SELECT max(u.id) FROM messages u WHERE u.conversation_id = "
        "messages.conversation_id AND u.role = 'user' AND u.id < messages.id) WHERE role = 'assistant'"
    )


def downgrade() -> None:
    # Alternatives that are not selected have no place in the old schema: they go.
    op.execute("DELETE FROM messages WHERE NOT selected")
    op.execute("UPDATE messages SET parent_id = NULL")  # as in upgrade: nothing to cascade during the rebuild
    with op.batch_alter_table('messages', schema=None, table_kwargs=TABLE_KWARGS) as batch_op:
        batch_op.drop_constraint('fk_messages_parent_id_messages', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_messages_parent_id'))
        batch_op.drop_index(batch_op.f('ix_messages_public_id'))
        batch_op.drop_column('selected')
        batch_op.drop_column('parent_id')
        batch_op.drop_column('public_id')
