"""At most one streaming answer per conversation: a partial unique index on messages(conversation_id).

Replicas share the database, and each checks that a conversation has no "streaming" answer before
starting one (ChatService.start_answer); two sends at the same moment on two replicas both pass
that check. The index makes the database refuse the second "streaming" row, which the service
answers with 409 like the check. SQLite (3.8+) and PostgreSQL both have partial indexes.

Rows that already break it (leftovers of that race, or of a crash) keep only each conversation's
newest answer streaming; the others become "interrupted", as a killed server's rows do.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 16:40:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

WHERE = sa.text("status = 'streaming'")


def upgrade() -> None:
    op.execute(
        "UPDATE messages SET status = 'interrupted' WHERE status = 'streaming' AND id NOT IN "
        "(SELECT max(id) FROM messages WHERE status = 'streaming' GROUP BY conversation_id)"
    )
    op.create_index('ux_messages_one_streaming', 'messages', ['conversation_id'], unique=True,
                    sqlite_where=WHERE, postgresql_where=WHERE)


def downgrade() -> None:
    op.drop_index('ux_messages_one_streaming', table_name='messages')
