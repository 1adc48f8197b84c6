"""Data functions: every read and write of conversations and messages goes through here.

Each write is its own short transaction (commit inside the function), so a
streaming answer never holds the SQLite write lock between tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import ONE_STREAMING_INDEX, STATUS_INTERRUPTED, STATUS_STREAMING, Conversation, Message, utcnow

T = TypeVar("T")

CONVERSATION_FIELDS = ("title", "system_prompt", "temperature", "top_k", "top_p", "max_new_tokens", "model",
                       "repetition_penalty", "frequency_penalty", "presence_penalty")


def retry_on_busy(fn: Callable[[], T], attempts: int = 5, delay: float = 0.05) -> T:
    """Run ``fn``, retrying when SQLite still reports "database is locked" after its busy timeout."""
    for attempt in range(attempts):
        try:
            return fn()
        except OperationalError as exc:
            if "locked" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(delay * (2**attempt))
    raise AssertionError("unreachable")


# --- conversations -------------------------------------------------------------


def create_conversation(session: Session, owner: str, **fields: Any) -> Conversation:
    conversation = Conversation(owner=owner, **{k: v for k, v in fields.items() if k in CONVERSATION_FIELDS})
    session.add(conversation)
    session.commit()
    return conversation


def list_conversations(session: Session, owner: str, limit: int = 100, offset: int = 0) -> list[Conversation]:
    query = (
        select(Conversation)
        .where(Conversation.owner == owner)
        .order_by(Conversation.updated_at.desc(), Conversation.id)
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(query))


def count_conversations(session: Session, owner: str) -> int:
    return session.scalar(select(func.count()).select_from(Conversation).where(Conversation.owner == owner)) or 0


def get_conversation(session: Session, owner: str, conversation_id: str) -> Conversation | None:
    """The conversation if it exists *and* belongs to ``owner``; anything else is None (a 404 to the caller)."""
    conversation = session.get(Conversation, conversation_id)
    if conversation is None or conversation.owner != owner:
        return None
    return conversation


def update_conversation(session: Session, conversation: Conversation, changes: dict[str, Any]) -> Conversation:
    for key, value in changes.items():
        if key not in CONVERSATION_FIELDS:
            raise ValueError(f"conversation has no editable field {key!r}")
        setattr(conversation, key, value)
    conversation.updated_at = utcnow()
    session.commit()
    return conversation


def delete_conversation(session: Session, conversation: Conversation) -> None:
    session.execute(delete(Message).where(Message.conversation_id == conversation.id))
    session.delete(conversation)
    session.commit()


# --- messages ------------------------------------------------------------------


def list_messages(session: Session, conversation_id: str) -> list[Message]:
    """The conversation as it reads: its user messages and the selected answer to each, oldest first."""
    query = (
        select(Message)
        .where(Message.conversation_id == conversation_id, Message.selected.is_(True))
        .order_by(Message.id)
    )
    return list(session.scalars(query))


def get_message(session: Session, conversation_id: str, public_id: str) -> Message | None:
    """A message of this conversation by its public id, alternatives included; None if there is none."""
    query = select(Message).where(Message.conversation_id == conversation_id, Message.public_id == public_id)
    return session.scalars(query).first()


def alternatives(session: Session, conversation_id: str) -> dict[int, list[str]]:
    """For each user message answered more than once: the public ids of its answers, oldest first."""
    query = (
        select(Message.parent_id, Message.public_id)
        .where(Message.conversation_id == conversation_id, Message.role == "assistant", Message.parent_id.is_not(None))
        .order_by(Message.id)
    )
    answers: dict[int, list[str]] = {}
    for parent_id, public_id in session.execute(query):
        answers.setdefault(parent_id, []).append(public_id)
    return {parent: ids for parent, ids in answers.items() if len(ids) > 1}


def select_answer(session: Session, answer: Message) -> None:
    """Make ``answer`` the one shown for its question (and put in the next prompt); its siblings step back."""
    session.execute(
        update(Message)
        .where(Message.conversation_id == answer.conversation_id, Message.parent_id == answer.parent_id)
        .values(selected=Message.id == answer.id)
    )
    session.execute(update(Conversation).where(Conversation.id == answer.conversation_id).values(updated_at=utcnow()))
    session.commit()


def add_message(session: Session, conversation_id: str, role: str, content: str, **fields: Any) -> Message:
    message = Message(conversation_id=conversation_id, role=role, content=content, **fields)
    session.add(message)
    session.execute(update(Conversation).where(Conversation.id == conversation_id).values(updated_at=utcnow()))
    session.commit()
    return message


def delete_message(session: Session, message: Message) -> None:
    session.delete(message)
    session.commit()


def begin_turn(
    session: Session,
    conversation_id: str,
    *,
    user_content: str | None,
    parent: Message | None,
    truncate_from: Message | None = None,
    set_aside: Message | None = None,
    continued: Message | None = None,
    **answer_fields: Any,
) -> tuple[Message | None, Message]:
    """Write a turn's start in one transaction, so the conversation is never half changed.

    ``truncate_from``: that message and every later one go (an edited question is asked again).
    ``set_aside``: the answer being regenerated; kept as an alternative if it has text, else deleted.
    ``user_content``: a new user message, which the answer then answers; else ``parent`` is the
    question answered. ``continued``: no new row, that answer is written into again.
    Returns the new user message (or None) and the answer's row.

    :class:`AnswerStreaming` when another answer of the conversation is streaming by the time this
    transaction writes (another replica's turn that passed the service's check at the same moment),
    found by the check under the conversation's lock or, should anything get past it, by the unique
    index of migration 0004: the transaction is rolled back, so nothing of this turn is stored, the
    user's message included.
    """
    try:
        return _begin_turn(session, conversation_id, user_content=user_content, parent=parent,
                           truncate_from=truncate_from, set_aside=set_aside, continued=continued, **answer_fields)
    except AnswerStreaming:
        session.rollback()
        raise
    except IntegrityError as exc:
        session.rollback()
        if is_one_streaming_violation(exc):
            raise AnswerStreaming(conversation_id) from None
        raise


def _begin_turn(
    session: Session,
    conversation_id: str,
    *,
    user_content: str | None,
    parent: Message | None,
    truncate_from: Message | None,
    set_aside: Message | None,
    continued: Message | None,
    **answer_fields: Any,
) -> tuple[Message | None, Message]:
    # The conversation's row first: its lock makes turns of one conversation take turns (PostgreSQL's
    # row lock; SQLite's single writer), so the check below sees every turn committed before this
    # one, whichever replica wrote it. Checked here, not only by the unique index: an edit deletes
    # rows and a regenerate sets one aside, which another turn's fresh answer must not lose.
    session.execute(update(Conversation).where(Conversation.id == conversation_id).values(updated_at=utcnow()))
    if streaming_answer(session, conversation_id) is not None:
        raise AnswerStreaming(conversation_id)
    if truncate_from is not None:
        session.execute(
            delete(Message).where(Message.conversation_id == conversation_id, Message.id >= truncate_from.id)
        )
    if set_aside is not None:
        if set_aside.content:
            set_aside.selected = False
        else:
            session.delete(set_aside)
    user = None
    if user_content is not None:
        user = parent = Message(conversation_id=conversation_id, role="user", content=user_content)
        session.add(user)
        session.flush()  # its id, for the answer's parent_id
    if continued is not None:
        answer = continued
        for key, value in answer_fields.items():
            setattr(answer, key, value)
        answer.updated_at = utcnow()
    else:
        if parent is not None:  # earlier answers to the same question step back
            session.execute(
                update(Message).where(Message.parent_id == parent.id, Message.selected.is_(True)).values(selected=False)
            )
        answer = Message(conversation_id=conversation_id, role="assistant", content="",
                         parent_id=parent.id if parent is not None else None, **answer_fields)
        session.add(answer)
    session.commit()
    return user, answer


def write_message(sessions: sessionmaker[Session], message_id: int, **fields: Any) -> None:
    """Update one message in its own short transaction (used while an answer streams)."""

    def _write() -> None:
        with sessions() as session:
            session.execute(update(Message).where(Message.id == message_id).values(updated_at=utcnow(), **fields))
            session.commit()

    retry_on_busy(_write)


def interrupt_streaming_messages(session: Session, renewed_before: datetime | None = None) -> int:
    """Mark answers left "streaming" by a stopped or killed server as "interrupted"; returns how many.

    ``renewed_before``: only those whose row was last written before then (where other processes
    share the database, a recent row is a live answer of theirs; app.services.cancellation).
    """
    query = update(Message).where(Message.status == STATUS_STREAMING)
    if renewed_before is not None:
        query = query.where(Message.updated_at < renewed_before)
    result = session.execute(query.values(status=STATUS_INTERRUPTED, updated_at=utcnow()))
    session.commit()
    return result.rowcount or 0


# --- answers across processes (app.services.cancellation) -------------------------


class AnswerStreaming(Exception):
    """Another answer of this conversation is streaming: a turn cannot start (:func:`begin_turn`)."""


def is_one_streaming_violation(exc: IntegrityError) -> bool:
    """Whether ``exc`` is the database refusing a second streaming answer in a conversation (the
    partial unique index of migration 0004), not some other constraint."""
    diag = getattr(exc.orig, "diag", None)  # psycopg names the constraint
    if diag is not None and getattr(diag, "constraint_name", None):
        return diag.constraint_name == ONE_STREAMING_INDEX
    # SQLite names the columns instead, and conversation_id is in no other unique index.
    return "UNIQUE constraint failed: messages.conversation_id" in str(exc.orig)


def streaming_answer(session: Session, conversation_id: str) -> Message | None:
    """The conversation's streaming answer, whichever process generates it; None if there is none."""
    query = select(Message).where(Message.conversation_id == conversation_id, Message.status == STATUS_STREAMING)
    return session.scalars(query).first()


def read_message(sessions: sessionmaker[Session], message_id: int) -> Message | None:
    """One message as it is now, read in its own short session (a follower polling another
    process's answer); None once it is deleted."""
    with sessions() as session:
        return session.get(Message, message_id)



def stop_streaming(session: Session, conversation_id: str) -> int:
    """Mark the conversation's streaming answer "interrupted", whichever process generates it (that
    process sees the row change at its next poll and cancels the generation); returns how many."""
    result = session.execute(
        update(Message)
        .where(Message.conversation_id == conversation_id, Message.status == STATUS_STREAMING)
        .values(status=STATUS_INTERRUPTED, updated_at=utcnow())
    )
    session.commit()
    return result.rowcount or 0


def still_streaming(session: Session, message_ids: Collection[int]) -> set[int]:
    """Which of these answers are still "streaming" (not stopped, not deleted)."""
    query = select(Message.id).where(Message.id.in_(list(message_ids)), Message.status == STATUS_STREAMING)
    return set(session.scalars(query))


def renew_streaming(session: Session, message_ids: Collection[int]) -> None:
    """Touch these streaming answers: a row renewed within the lease belongs to a live process."""
    session.execute(
        update(Message)
        .where(Message.id.in_(list(message_ids)), Message.status == STATUS_STREAMING)
        .values(updated_at=utcnow())
    )
    session.commit()
