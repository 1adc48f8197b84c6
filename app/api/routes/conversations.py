"""Conversations: list, create, read (with messages), update settings or title, delete.

A conversation is held with one chat model, chosen when it is created (by default the
registry's default) and used for all its answers; its decoding settings start from that
model's defaults (``generation_defaults`` in its checkpoint's metadata) over the service's.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response

from app.api.deps import ActiveDep, ConversationDep, ModelsDep, OwnerDep, SessionDep, SettingsDep
from app.db import crud
from app.db.models import STATUS_STREAMING
from app.schemas import (
    NOT_FOUND,
    ConversationCreate,
    ConversationDetail,
    ConversationList,
    ConversationPublic,
    ConversationUpdate,
    ErrorBody,
)
from app.services.chat import NEW_CHAT_TITLE, public_thread
from app.services.registry import UnknownModel
from app.settings import Settings

router = APIRouter(prefix="/api/v1/conversations", tags=["conversations"])


def _check_max_new_tokens(value: int | None, settings: Settings) -> None:
    if value is not None and value > settings.max_new_tokens_cap:
        raise HTTPException(
            422, detail=f"max_new_tokens {value} is over the limit {settings.max_new_tokens_cap} (SCRATCHGPT_MAX_NEW_TOKENS_CAP)"
        )


@router.get("", response_model=ConversationList)
def list_conversations(
    session: SessionDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> ConversationList:
    """This owner's conversations, most recently active first."""
    items = crud.list_conversations(session, owner.id, limit=limit, offset=offset)
    return ConversationList(
        conversations=[ConversationPublic.model_validate(c) for c in items],
        total=crud.count_conversations(session, owner.id),
    )


@router.post("", response_model=ConversationPublic, status_code=201,
             responses={404: {"model": ErrorBody, "description": "No chat model of that name is served (the detail lists those that are)"}})
def create_conversation(
    body: ConversationCreate, session: SessionDep, owner: OwnerDep, settings: SettingsDep, models: ModelsDep
) -> ConversationPublic:
    """Start a conversation with a chat model (by default the default one); unset settings take that
    model's decoding defaults, then the service's. A model that is not ready yet may be chosen: its
    answers wait for it (503 with the reason until then)."""
    _check_max_new_tokens(body.max_new_tokens, settings)
    try:
        slot = models.chat_slot(body.model)
    except UnknownModel as exc:
        raise HTTPException(404, detail=str(exc)) from None
    fields = body.model_dump(exclude_none=True)
    defaults = {
        "title": NEW_CHAT_TITLE,
        "system_prompt": settings.default_system_prompt,
        **models.conversation_defaults(slot),
        "max_new_tokens": min(settings.default_max_new_tokens, settings.max_new_tokens_cap),
        "model": slot.name,
    }
    conversation = crud.create_conversation(session, owner.id, **{**defaults, **fields})
    return ConversationPublic.model_validate(conversation)


@router.get("/{conversation_id}", response_model=ConversationDetail, responses=NOT_FOUND)
def read_conversation(conversation: ConversationDep, session: SessionDep, active: ActiveDep) -> ConversationDetail:
    """The conversation with all its messages, oldest first."""
    messages = public_thread(session, conversation.id)
    return ConversationDetail(
        **ConversationPublic.model_validate(conversation).model_dump(),
        messages=messages,
        # A streaming row: this process or another replica is generating it.
        generating=active.is_active(conversation.id) or any(m.status == STATUS_STREAMING for m in messages),
    )


@router.patch("/{conversation_id}", response_model=ConversationPublic, responses=NOT_FOUND)
def update_conversation(
    body: ConversationUpdate, conversation: ConversationDep, session: SessionDep, settings: SettingsDep
) -> ConversationPublic:
    """Rename, or change the system prompt and sampling settings used for the next answers."""
    changes = body.model_dump(exclude_unset=True)
    _check_max_new_tokens(changes.get("max_new_tokens"), settings)
    if "title" in changes:
        changes["title"] = " ".join(changes["title"].split())[: settings.max_title_chars] or "Untitled"
    conversation = crud.update_conversation(session, conversation, changes)
    return ConversationPublic.model_validate(conversation)


@router.delete("/{conversation_id}", status_code=204, response_class=Response, responses=NOT_FOUND)
def delete_conversation(conversation: ConversationDep, session: SessionDep, active: ActiveDep) -> Response:
    """Delete the conversation and its messages; a running answer is stopped first (on another replica,
    at its next poll of the deleted row)."""
    active.stop(conversation.id)
    crud.delete_conversation(session, conversation)
    return Response(status_code=204)
