"""Messages: send one and stream the answer (SSE), regenerate the last answer, stop.

SSE events of a streaming answer:
  ``start``  {assistant_message_id, user_message?, prompt_tokens, max_new_tokens, dropped_messages, model}
  ``delta``  {text}                                  (repeated)
  ``done``   {message, prompt_tokens, completion_tokens, tokens_per_second, duration_ms, finish_reason, dropped_messages}
  ``error``  {detail, message}                       (instead of done, when generation fails)
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app.api.deps import ConversationDep, ModelsDep, SessionDep, SettingsDep
from app.services.prompts import PromptTooLong, generation_config, plan_prompt
from app.db import crud
from app.db.models import STATUS_ERROR, STATUS_STREAMING, Conversation, Message
from app.services.registry import CHAT, ModelRegistry
from app.schemas import (
    MODEL_RESPONSES,
    NOT_FOUND,
    MessageCreate,
    MessagePublic,
    RegenerateRequest,
    StopResult,
)
from app.settings import Settings
from app.services.streaming import AnswerStream, ManagedStream

router = APIRouter(prefix="/api/v1/conversations", tags=["messages"])

SSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-Sent Events: start, delta..., then done (or error)",
        # itemSchema (OpenAPI 3.2, as FastAPI's own SSE routes write it) describes one event;
        # a "schema" here would claim the whole stream is a single string.
        "content": {
            "text/event-stream": {
                "itemSchema": {
                    "type": "object",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {"type": "string", "enum": ["start", "delta", "done", "error"]},
                        "data": {"type": "string", "contentMediaType": "application/json"},
                    },
                }
            }
        },
    },
    409: {"description": "An answer is already being generated in this conversation"},
    422: {"description": "Invalid message, or too long for the model's context window"},
    **NOT_FOUND,
    **MODEL_RESPONSES,
}


def _history(messages: list[Message]) -> list[dict[str, str]]:
    """The turns the model sees: user messages and answers with text (partial answers included)."""
    return [
        {"role": m.role, "content": m.content}
        for m in messages
        if m.role == "user" or (m.role == "assistant" and m.status != STATUS_ERROR and m.content)
    ]


def _auto_title(text: str) -> str:
    words = " ".join(text.split())
    return words if len(words) <= 60 else words[:57].rstrip() + "..."


def _start_answer(
    request: Request,
    session: Session,
    conversation: Conversation,
    models: ModelRegistry,
    settings: Settings,
    new_user_message: str | None,
    seed: int | None,
    replace_last_answer: bool = False,
) -> ManagedStream:
    slot = models.require(CHAT)
    checkpoint = slot.checkpoint
    active = request.app.state.active
    if not active.claim(conversation.id):
        raise HTTPException(409, detail="an answer is already being generated in this conversation; stop it first")
    try:
        messages = crud.list_messages(session, conversation.id)
        replaced = messages.pop() if replace_last_answer and messages and messages[-1].role == "assistant" else None
        history = _history(messages)
        if new_user_message is not None:
            history.append({"role": "user", "content": new_user_message})
        if not history or history[-1]["role"] != "user":
            raise HTTPException(409, detail="the conversation does not end with a user message; send one first")
        max_new = min(conversation.max_new_tokens, settings.max_new_tokens_cap)
        try:
            plan = plan_prompt(checkpoint, conversation.system_prompt, history, max_new)
        except PromptTooLong as exc:
            raise HTTPException(422, detail=str(exc)) from None
        config = generation_config(
            checkpoint,
            temperature=conversation.temperature,
            top_k=conversation.top_k,
            top_p=conversation.top_p,
            max_new_tokens=plan.max_new_tokens,
            seed=seed,
        )
        if replaced is not None:
            crud.delete_message(session, replaced)
        user_public = None
        if new_user_message is not None:
            # Stored before generation starts: whatever happens next, the question is kept.
            user = crud.add_message(session, conversation.id, "user", new_user_message)
            user_public = MessagePublic.model_validate(user).model_dump(mode="json")
            if conversation.title == "New chat":
                crud.update_conversation(session, conversation, {"title": _auto_title(new_user_message)})
        assistant = crud.add_message(
            session, conversation.id, "assistant", "",
            status=STATUS_STREAMING, prompt_tokens=len(plan.prompt_ids), dropped_messages=plan.dropped_messages,
        )
    except BaseException:
        active.release(conversation.id)
        raise
    worker = slot.worker
    answer = AnswerStream(
        sessions=request.app.state.sessions,
        active=active,
        metrics=request.app.state.metrics,
        conversation_id=conversation.id,
        assistant_id=assistant.id,
        user_message=user_public,
        plan=plan,
        submit=lambda: worker.submit(plan.prompt_ids, config),
        model_name=slot.name,
        flush_seconds=settings.stream_flush_seconds,
    )
    return ManagedStream(answer.events(), on_close=answer.close)


@router.get("/{conversation_id}/messages", response_model=list[MessagePublic], responses=NOT_FOUND)
def list_messages(conversation: ConversationDep, session: SessionDep) -> list[MessagePublic]:
    return [MessagePublic.model_validate(m) for m in crud.list_messages(session, conversation.id)]


@router.post("/{conversation_id}/messages", response_class=StreamingResponse, responses=SSE_RESPONSES)
def send_message(
    body: MessageCreate,
    conversation: ConversationDep,
    session: SessionDep,
    models: ModelsDep,
    settings: SettingsDep,
    request: Request,
) -> ManagedStream:
    """Add the user's message and stream the assistant's answer as Server-Sent Events."""
    if len(body.content) > settings.max_message_chars:
        raise HTTPException(
            422,
            detail=f"the message has {len(body.content)} characters; the limit is {settings.max_message_chars} "
            "(SCRATCHGPT_MAX_MESSAGE_CHARS)",
        )
    return _start_answer(request, session, conversation, models, settings, body.content, body.seed)


@router.post("/{conversation_id}/regenerate", response_class=StreamingResponse, responses=SSE_RESPONSES)
def regenerate(
    conversation: ConversationDep,
    session: SessionDep,
    models: ModelsDep,
    settings: SettingsDep,
    request: Request,
    body: RegenerateRequest | None = None,
) -> ManagedStream:
    """Replace the last answer with a new one, streamed like a new message."""
    seed = body.seed if body else None
    return _start_answer(request, session, conversation, models, settings, None, seed, replace_last_answer=True)


@router.post("/{conversation_id}/stop", response_model=StopResult, responses=NOT_FOUND)
def stop(conversation: ConversationDep, request: Request) -> StopResult:
    """Stop the answer being generated; it is kept, marked interrupted. ``stopped`` is false if none was running."""
    return StopResult(stopped=request.app.state.active.stop(conversation.id))
