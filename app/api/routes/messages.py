"""Messages: send one and stream the answer (SSE), regenerate the last answer, stop.

SSE events of a streaming answer:
  ``start``  {conversation_id, assistant_message_id, user_message?, prompt_tokens, max_new_tokens, dropped_messages, model}
  ``queued`` {ahead}                                 (while other answers hold the engine's places; repeated)
  ``delta``  {text}                                  (repeated)
  ``done``   {message, prompt_tokens, cached_prompt_tokens, completion_tokens, tokens_per_second, duration_ms,
              finish_reason, dropped_messages}
  ``error``  {detail, message}                       (instead of done, when generation fails)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import StreamingResponse

from app.api.deps import ActiveDep, ChatDep, ConversationDep, SessionDep, SettingsDep
from app.db import crud
from app.schemas import (
    MODEL_RESPONSES,
    NOT_FOUND,
    MessageCreate,
    MessagePublic,
    RegenerateRequest,
    StopResult,
)
from app.services.chat import ConversationBusy, NothingToAnswer
from app.services.prompts import PromptTooLong
from app.services.streaming import ManagedStream
from app.services.workers import OwnerBusy, ServerBusy

router = APIRouter(prefix="/api/v1/conversations", tags=["messages"])

SSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-Sent Events: start, queued..., delta..., then done (or error)",
        # itemSchema (OpenAPI 3.2, as FastAPI's own SSE routes write it) describes one event;
        # a "schema" here would claim the whole stream is a single string.
        "content": {
            "text/event-stream": {
                "itemSchema": {
                    "type": "object",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {"type": "string", "enum": ["start", "queued", "delta", "done", "error"]},
                        "data": {"type": "string", "contentMediaType": "application/json"},
                    },
                }
            }
        },
    },
    409: {"description": "An answer is already being generated in this conversation"},
    422: {"description": "Invalid message, or too long for the model's context window"},
    429: {"description": "This user has as many answers waiting as it may; retry after Retry-After seconds"},
    503: {"description": "The chat queue is full (or the model is not serving); retry after Retry-After seconds"},
    **NOT_FOUND,
    **MODEL_RESPONSES,
}


@contextmanager
def _refusals() -> Iterator[None]:
    """The chat service's refusals as HTTP answers: 409 for the conversation's state, 422 for the prompt,
    429 for an owner past its queue limit and 503 for a full queue (both with Retry-After)."""
    try:
        yield
    except (ConversationBusy, NothingToAnswer) as exc:
        raise HTTPException(409, detail=str(exc)) from None
    except PromptTooLong as exc:
        raise HTTPException(422, detail=str(exc)) from None
    except OwnerBusy as exc:
        raise HTTPException(429, detail=str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
    except ServerBusy as exc:
        raise HTTPException(503, detail=str(exc), headers={"Retry-After": str(exc.retry_after)}) from None


@router.get("/{conversation_id}/messages", response_model=list[MessagePublic], responses=NOT_FOUND)
def list_messages(conversation: ConversationDep, session: SessionDep) -> list[MessagePublic]:
    return [MessagePublic.model_validate(m) for m in crud.list_messages(session, conversation.id)]


@router.post("/{conversation_id}/messages", response_class=StreamingResponse, responses=SSE_RESPONSES)
def send_message(body: MessageCreate, conversation: ConversationDep, chat: ChatDep, settings: SettingsDep) -> ManagedStream:
    """Add the user's message and stream the assistant's answer as Server-Sent Events."""
    if len(body.content) > settings.max_message_chars:
        raise HTTPException(
            422,
            detail=f"the message has {len(body.content)} characters; the limit is {settings.max_message_chars} "
            "(SCRATCHGPT_MAX_MESSAGE_CHARS)",
        )
    with _refusals():
        return chat.start_answer(conversation, body.content, body.seed)


@router.post("/{conversation_id}/regenerate", response_class=StreamingResponse, responses=SSE_RESPONSES)
def regenerate(conversation: ConversationDep, chat: ChatDep, body: RegenerateRequest | None = None) -> ManagedStream:
    """Replace the last answer with a new one, streamed like a new message."""
    with _refusals():
        return chat.start_answer(conversation, None, body.seed if body else None, replace_last_answer=True)


@router.post("/{conversation_id}/stop", response_model=StopResult, responses=NOT_FOUND)
def stop(conversation: ConversationDep, active: ActiveDep, session: SessionDep) -> StopResult:
    """Stop the answer being generated; it is kept, marked interrupted. ``stopped`` is false if none was running.

    Here, the job is cancelled at once; generated by another replica, its row is marked and that
    replica cancels it at its next poll (app.services.cancellation)."""
    here = active.stop(conversation.id)
    elsewhere = crud.stop_streaming(session, conversation.id) > 0
    return StopResult(stopped=here or elsewhere)
