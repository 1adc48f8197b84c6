"""Messages: send one and stream the answer (SSE); edit one and send it again; regenerate the last
answer (the earlier ones stay as alternatives) and pick among them; continue a cut-off answer;
follow an answer in progress; stop.

An answer is generated in the background: a client that stops reading does not stop it (only
``stop`` does), and ``GET .../answer`` follows it again.

SSE events of a streaming answer:
  ``start``  {conversation_id, assistant_message_id, user_message?, prompt_tokens, max_new_tokens, dropped_messages, model}
  ``queued`` {ahead}                                 (while other answers hold the engine's places; repeated)
  ``delta``  {text}                                  (repeated; a client following late gets the text so far first)
  ``done``   {message, prompt_tokens, cached_prompt_tokens, completion_tokens, tokens_per_second, duration_ms,
              finish_reason, dropped_messages}
  ``error``  {detail, message}                       (instead of done, when generation fails)
Continuing an answer streams only the new text; ``done``'s message has all of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import ActiveDep, ChatDep, ConversationDep, SessionDep, SettingsDep
from app.db import crud
from app.db.models import Message
from app.schemas import (
    MODEL_RESPONSES,
    NOT_FOUND,
    ErrorBody,
    MessageCreate,
    MessagePublic,
    RegenerateRequest,
    StopResult,
)
from app.services.chat import (
    CONTINUE,
    EDIT,
    REGENERATE,
    ConversationBusy,
    NotAUserMessage,
    NothingToAnswer,
    NothingToContinue,
    public_thread,
)
from app.services.prompts import PromptTooLong
from app.services.streaming import ManagedStream, RowFollower
from app.services.workers import OwnerBusy, ServerBusy
from app.settings import Settings

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
    """The chat service's refusals as HTTP answers: 409 for the conversation's state (or a message that
    is not one this turn can start from: a well-formed id of the wrong kind), 422 for the prompt,
    429 for an owner past its queue limit and 503 for a full queue (both with Retry-After)."""
    try:
        yield
    except (ConversationBusy, NothingToAnswer, NothingToContinue, NotAUserMessage) as exc:
        raise HTTPException(409, detail=str(exc)) from None
    except PromptTooLong as exc:
        raise HTTPException(422, detail=str(exc)) from None
    except OwnerBusy as exc:
        raise HTTPException(429, detail=str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
    except ServerBusy as exc:
        raise HTTPException(503, detail=str(exc), headers={"Retry-After": str(exc.retry_after)}) from None


MessageId = Annotated[str, Path(min_length=1, max_length=64, description="A message's id (as the API shows it)")]
MESSAGE_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such conversation for this owner, or no such message in it"},
}


def _message(session: SessionDep, conversation: ConversationDep, message_id: MessageId) -> Message:
    message = crud.get_message(session, conversation.id, message_id)
    if message is None:
        raise HTTPException(404, detail=f"conversation {conversation.id} has no message {message_id}")
    return message


MessageDep = Annotated[Message, Depends(_message)]


def _check_length(content: str, settings: Settings) -> None:
    if len(content) > settings.max_message_chars:
        raise HTTPException(
            422,
            detail=f"the message has {len(content)} characters; the limit is {settings.max_message_chars} "
            "(SCRATCHGPT_MAX_MESSAGE_CHARS)",
        )


@router.get("/{conversation_id}/messages", response_model=list[MessagePublic], responses=NOT_FOUND)
def list_messages(conversation: ConversationDep, session: SessionDep) -> list[MessagePublic]:
    """The conversation as it reads: each question and its selected answer, oldest first."""
    return public_thread(session, conversation.id)


@router.post("/{conversation_id}/messages", response_class=StreamingResponse, responses=SSE_RESPONSES)
def send_message(body: MessageCreate, conversation: ConversationDep, chat: ChatDep, settings: SettingsDep) -> ManagedStream:
    """Add the user's message and stream the assistant's answer as Server-Sent Events."""
    _check_length(body.content, settings)
    with _refusals():
        return chat.start_answer(conversation, body.content, body.seed)


@router.post("/{conversation_id}/messages/{message_id}/edit", response_class=StreamingResponse,
             responses={**SSE_RESPONSES, **MESSAGE_NOT_FOUND,
                        409: {"description": "An answer is already being generated, or the message is an answer"}})
def edit_message(
    body: MessageCreate, conversation: ConversationDep, message: MessageDep, chat: ChatDep, settings: SettingsDep
) -> ManagedStream:
    """Replace a user message with ``content`` and answer it again, streamed like a new message.

    The messages after it (and its answers) are removed, in the same transaction that stores the
    new text: the conversation goes on from the edited message."""
    _check_length(body.content, settings)
    with _refusals():
        return chat.start_answer(conversation, body.content, body.seed, mode=EDIT, edited=message)


@router.post("/{conversation_id}/regenerate", response_class=StreamingResponse, responses=SSE_RESPONSES)
def regenerate(conversation: ConversationDep, chat: ChatDep, body: RegenerateRequest | None = None) -> ManagedStream:
    """Answer the last question again, streamed like a new message; the answer it had stays as an
    alternative (see ``alternatives`` and ``select``)."""
    with _refusals():
        return chat.start_answer(conversation, None, body.seed if body else None, mode=REGENERATE)


@router.post("/{conversation_id}/continue", response_class=StreamingResponse, responses=SSE_RESPONSES)
def continue_answer(conversation: ConversationDep, chat: ChatDep, body: RegenerateRequest | None = None) -> ManagedStream:
    """Go on writing the last answer where the token limit (or a stop) cut it: the model reads the
    conversation and the answer so far, and the new text is appended to the same message."""
    with _refusals():
        return chat.start_answer(conversation, None, body.seed if body else None, mode=CONTINUE)


@router.post("/{conversation_id}/messages/{message_id}/select", response_model=list[MessagePublic],
             responses={409: {"model": ErrorBody,
                              "description": "An answer is being generated in this conversation, or the message is a question"},
                        **MESSAGE_NOT_FOUND})
def select_answer(
    conversation: ConversationDep, message: MessageDep, session: SessionDep, active: ActiveDep
) -> list[MessagePublic]:
    """Show this answer for its question (one of its ``alternatives``); the next turn's prompt uses it.
    Answers the conversation as it now reads."""
    if message.role != "assistant":
        raise HTTPException(409, detail=f"message {message.public_id} is a user message; pick one of an answer's alternatives")
    if active.is_active(conversation.id):
        raise HTTPException(409, detail="an answer is being generated in this conversation; wait for it or stop it")
    crud.select_answer(session, message)
    return public_thread(session, conversation.id)


@router.get("/{conversation_id}/answer", response_class=StreamingResponse,
            responses={**SSE_RESPONSES, 204: {"description": "No answer is being generated in this conversation"}})
async def follow_answer(conversation: ConversationDep, active: ActiveDep, chat: ChatDep) -> Response:
    """Follow the answer being generated now (the same events, the text so far as the first delta);
    204 when there is none (which also tells an EventSource not to reconnect).

    Generated by another replica, it is followed from its row in the database, as that replica
    flushes it (app.services.streaming.RowFollower)."""
    answer = active.get(conversation.id)
    if answer is not None:
        return answer.response(late=True)
    row = await run_in_threadpool(crud.streaming_answer, chat.session, conversation.id)
    if row is None:
        return Response(status_code=204)
    start = {
        "conversation_id": conversation.id,
        "assistant_message_id": row.public_id,
        "prompt_tokens": row.prompt_tokens,
        "max_new_tokens": min(conversation.max_new_tokens, chat.settings.max_new_tokens_cap),
        "dropped_messages": row.dropped_messages,
        "model": conversation.model or chat.models.default_chat().name,
    }
    follower = RowFollower(chat.sessions, row, start, poll_seconds=chat.settings.stream_flush_seconds,
                           settle_seconds=chat.settings.stream_lease_seconds)
    return follower.response()


@router.post("/{conversation_id}/stop", response_model=StopResult, responses=NOT_FOUND)
def stop(conversation: ConversationDep, active: ActiveDep, session: SessionDep) -> StopResult:
    """Stop the answer being generated; it is kept, marked interrupted. ``stopped`` is false if none was running.

    Here, the job is cancelled at once; generated by another replica, its row is marked and that
    replica cancels it at its next poll (app.services.cancellation)."""
    here = active.stop(conversation.id)
    elsewhere = crud.stop_streaming(session, conversation.id) > 0
    return StopResult(stopped=here or elsewhere)
