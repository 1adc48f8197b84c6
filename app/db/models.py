"""Tables: conversations and their messages (SQLAlchemy 2.0 declarative models).

The schema itself is owned by the Alembic migrations in ``migrations/``; these
classes must stay in step with them (``tests/app/test_db.py`` runs ``alembic check``).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text, func, text, true
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Message.status values. "streaming" rows exist only while a worker writes into
# them; a crash leaves them behind and startup turns them into "interrupted".
STATUS_COMPLETE = "complete"
STATUS_STREAMING = "streaming"
STATUS_INTERRUPTED = "interrupted"
STATUS_ERROR = "error"
STATUSES = (STATUS_COMPLETE, STATUS_STREAMING, STATUS_INTERRUPTED, STATUS_ERROR)

# At most one "streaming" answer per conversation, kept by the database itself (migration 0004):
# two replicas sending into one conversation at the same moment both pass the busy check in
# ChatService.start_answer, and only this index makes the second insert fail.
ONE_STREAMING_INDEX = "ux_messages_one_streaming"
ONE_STREAMING_WHERE = f"status = '{STATUS_STREAMING}'"


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def new_id() -> str:
    # Random, not sequential: ids in URLs must not let one owner guess another's.
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    pass


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    title: Mapped[str] = mapped_column(String(200), default="New chat")
    model: Mapped[str] = mapped_column(String(200), default="")
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    temperature: Mapped[float] = mapped_column(Float, default=0.7)
    top_k: Mapped[int | None] = mapped_column(Integer, nullable=True)
    top_p: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_new_tokens: Mapped[int] = mapped_column(Integer, default=256)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.current_timestamp())
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.current_timestamp())
    # Penalties against repeating (core.generation.sampling.Penalties); the defaults penalize nothing.
    repetition_penalty: Mapped[float] = mapped_column(Float, default=1.0, server_default="1.0")
    frequency_penalty: Mapped[float] = mapped_column(Float, default=0.0, server_default="0.0")
    presence_penalty: Mapped[float] = mapped_column(Float, default=0.0, server_default="0.0")

    messages: Mapped[list["Message"]] = relationship(
        back_populates="conversation",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Message.id",
        foreign_keys="Message.conversation_id",
    )

    __table_args__ = (Index("ix_conversations_owner_updated", "owner", "updated_at"),)


class Message(Base):
    """One message. ``id`` is internal (the order of a conversation's messages); clients see
    ``public_id``, random, so a message id says nothing about how many messages the service holds.

    Regenerating keeps the earlier answers: every answer to one user message points to it with
    ``parent_id``, and exactly one of them is ``selected``, the one shown and put in the next
    turn's prompt. The others are its alternatives.
    """

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, index=True, default=new_id)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), nullable=True, index=True)
    selected: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))  # "user" | "assistant"
    content: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default=STATUS_COMPLETE)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    duration_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # How many earlier messages were left out of the prompt to fit the context window.
    dropped_messages: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.current_timestamp())
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.current_timestamp())

    conversation: Mapped[Conversation] = relationship(back_populates="messages")

    __table_args__ = (
        Index(ONE_STREAMING_INDEX, "conversation_id", unique=True,
              sqlite_where=text(ONE_STREAMING_WHERE), postgresql_where=text(ONE_STREAMING_WHERE)),
        # Never reuse the id of a deleted message (a regenerated answer gets a new one).
        {"sqlite_autoincrement": True},
    )
