"""One chat turn: the question kept, the prompt fitted into the window, the answer started.

:meth:`ChatService.start_answer` is what every turn runs: sending a message, editing one and
sending it again, regenerating the last answer, continuing a cut-off one (:func:`plan_turn`
says what each reads and writes). In order: the chat model must be serving; the conversation is
claimed (one answer at a time: in this process, and through its rows on every replica; two
replicas' turns at the same moment are settled by the database in ``crud.begin_turn``); its
stored messages (the selected answers, not their alternatives) become the model's turns and are
fitted into the context window
(``app.services.prompts``); the answer is queued in the chat engine; only then is anything
written, in one transaction (``crud.begin_turn``): later messages removed for an edit, the
regenerated answer kept as an alternative, the user's message committed (whatever happens next,
the question is kept), and the answer's row created (or reopened) as "streaming". So a refusal
leaves the conversation as it was. :class:`app.services.streaming.AnswerStream` takes it from
there, in the background. A refusal is an error of its own (:class:`ConversationBusy`,
:class:`NothingToAnswer`, :class:`NothingToContinue`, :class:`NotAUserMessage`,
:class:`app.services.prompts.PromptTooLong`, and the engine's limits
:class:`app.services.workers.OwnerBusy` and :class:`~app.services.workers.ServerBusy`), which the
route turns into an HTTP status; this module knows nothing of requests.

Edits replace what followed the edited message instead of branching: a conversation stays one
line, which is what its prompt is, and the alternatives a user flips through are kept where they
cost nothing to understand (several answers to one question).
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio.from_thread
from sqlalchemy.orm import Session, sessionmaker

from app.db import crud
from app.db.models import STATUS_COMPLETE, STATUS_INTERRUPTED, STATUS_STREAMING, Conversation, Message
from app.metrics import Metrics
from app.schemas import MessagePublic
from app.services.prompts import conversation_turns, generation_config, plan_prompt, sent_messages
from app.services.registry import CHAT, ModelRegistry, ModelSlot, ModelUnavailable, UnknownModel
from app.services.streaming import ActiveGenerations, AnswerStream, ManagedStream
from app.settings import Settings

NEW_CHAT_TITLE = "New chat"


class ConversationBusy(RuntimeError):
    """An answer is already being generated in this conversation."""


BUSY = "an answer is already being generated in this conversation; stop it first"


class NothingToAnswer(ValueError):
    """The conversation does not end with a user message, so there is no question to answer."""


class NothingToContinue(ValueError):
    """The conversation does not end with an answer that was cut off or stopped."""


class NotAUserMessage(ValueError):
    """Only a user's own message can be edited and sent again."""


# The ways a turn starts (see ChatService.start_answer).
SEND, REGENERATE, CONTINUE, EDIT = "send", "regenerate", "continue", "edit"


def auto_title(text: str) -> str:
    """A new chat's title: its first message on one line, cut to 60 characters."""
    words = " ".join(text.split())
    return words if len(words) <= 60 else words[:57].rstrip() + "..."


def public_thread(session: Session, conversation_id: str) -> list[MessagePublic]:
    """The conversation as it reads (selected answers only), each answer listing its alternatives."""
    others = crud.alternatives(session, conversation_id)
    return [
        MessagePublic.model_validate(m).model_copy(update={"alternatives": others.get(m.parent_id, [])})
        if m.role == "assistant" else MessagePublic.model_validate(m)
        for m in crud.list_messages(session, conversation_id)
    ]


def can_continue(message: Message) -> bool:
    """An answer with text that the token limit cut, or that was stopped, can be written on."""
    cut = message.status == STATUS_COMPLETE and message.finish_reason == "length"
    return message.role == "assistant" and bool(message.content) and (cut or message.status == STATUS_INTERRUPTED)


@dataclass
class TurnPlan:
    """What a turn reads (the turns before the answer, a text the answer starts with) and what it writes."""

    history: list[dict[str, str]]
    answer_prefix: str = ""
    user_content: str | None = None
    parent: Message | None = None
    truncate_from: Message | None = None
    set_aside: Message | None = None
    continued: Message | None = None


def plan_turn(messages: list[Message], mode: str, text: str | None, edited: Message | None) -> TurnPlan:
    """The four ways a turn starts, on the conversation as it reads (``messages``, oldest first).

    send: ``text`` is a new question. regenerate: the last answer is set aside (kept as an
    alternative) and its question answered again; a conversation ending with a question gets its
    first answer. continue: the last answer, cut off or stopped, is written on. edit: ``edited``,
    a user message, and everything after it are replaced by ``text``, which is then answered.
    """
    last = messages[-1] if messages else None
    if mode == SEND:
        return TurnPlan(conversation_turns(messages) + [{"role": "user", "content": text or ""}], user_content=text)
    if mode == EDIT:
        assert edited is not None
        if edited.role != "user":
            raise NotAUserMessage(f"message {edited.public_id} is an answer; only your own messages can be edited")
        before = [m for m in messages if m.id < edited.id]
        return TurnPlan(conversation_turns(before) + [{"role": "user", "content": text or ""}],
                        user_content=text, truncate_from=edited)
    if mode == CONTINUE:
        if last is None or not can_continue(last):
            raise NothingToContinue(
                "the conversation does not end with an answer cut off by the token limit or stopped; nothing to continue"
            )
        return TurnPlan(conversation_turns(messages[:-1]), answer_prefix=last.content, continued=last)
    set_aside = last if last is not None and last.role == "assistant" else None
    kept = messages[:-1] if set_aside is not None else messages
    question = next((m for m in reversed(kept) if m.role == "user"), None)
    return TurnPlan(conversation_turns(kept), parent=question, set_aside=set_aside)


@dataclass
class ChatService:
    """What a chat turn needs of the app: the request's database session and the sessions that
    outlive it (the answer writes after the request has returned), the answers in progress,
    metrics, the models and the settings."""

    session: Session
    sessions: sessionmaker[Session]
    active: ActiveGenerations
    metrics: Metrics
    models: ModelRegistry
    settings: Settings

    def chat_model(self, conversation: Conversation) -> ModelSlot:
        """The chat model that answers in ``conversation``: the one it was started with (a conversation
        stored before it had one: the default), if it is serving; else :class:`ModelUnavailable`."""
        try:
            return self.models.require_chat(conversation.model or None)
        except UnknownModel as exc:
            raise ModelUnavailable(
                CHAT, "not served",
                f"this conversation is held with the chat model {exc.name!r}, which this server does not serve "
                f"now ({exc}); start a new chat, or serve it again (SCRATCHGPT_CHAT_MODELS)",
            ) from None

    def start_answer(
        self,
        conversation: Conversation,
        text: str | None,
        seed: int | None,
        mode: str = SEND,
        edited: Message | None = None,
    ) -> ManagedStream:
        """Start a turn (``mode``, see :func:`plan_turn`) and stream its answer to this request.

        The answer is generated in the background (:class:`AnswerStream`): it goes on if this
        request's client leaves.
        """
        slot = self.chat_model(conversation)
        checkpoint = slot.checkpoint
        session, active = self.session, self.active
        if not active.claim(conversation.id):
            raise ConversationBusy(BUSY)
        try:
            messages = crud.list_messages(session, conversation.id)
            # Another replica is answering here. Two sends at the same moment both pass this check:
            # crud.begin_turn's write is what settles that race.
            if any(m.status == STATUS_STREAMING for m in messages):
                raise ConversationBusy(BUSY)
            turn = plan_turn(messages, mode, text, edited)
            if not turn.history or turn.history[-1]["role"] != "user":
                raise NothingToAnswer("the conversation does not end with a user message; send one first")
            max_new = min(conversation.max_new_tokens, self.settings.max_new_tokens_cap)
            plan = plan_prompt(checkpoint, conversation.system_prompt, turn.history, max_new,
                               answer_prefix=turn.answer_prefix)
            config = generation_config(
                checkpoint,
                temperature=conversation.temperature,
                top_k=conversation.top_k,
                top_p=conversation.top_p,
                max_new_tokens=plan.max_new_tokens,
                seed=seed,
                repetition_penalty=conversation.repetition_penalty,
                frequency_penalty=conversation.frequency_penalty,
                presence_penalty=conversation.presence_penalty,
            )
            # Queued before anything is written: an owner or a server past its limits is refused
            # (OwnerBusy, ServerBusy) with the conversation as it was.
            # The owner "local" is every client of an open server without a session: not one user to limit.
            owner = None if conversation.owner == "local" else conversation.owner
            job = slot.worker.submit(plan.prompt_ids, config, owner=owner, messages=sent_messages(plan))
        except BaseException:
            active.release(conversation.id)
            raise
        continued = turn.continued
        prior = (continued.content, continued.completion_tokens or 0, continued.duration_ms or 0.0) if continued else ("", 0, 0.0)
        try:
            # The question (if new) and the answer's row, committed together before generation starts:
            # whatever happens next, the question is kept.
            user, assistant = crud.begin_turn(
                session, conversation.id,
                user_content=turn.user_content, parent=turn.parent, truncate_from=turn.truncate_from,
                set_aside=turn.set_aside, continued=continued,
                status=STATUS_STREAMING, finish_reason=None, error=None,
                prompt_tokens=len(plan.prompt_ids), dropped_messages=plan.dropped_messages,
            )
            user_public = MessagePublic.model_validate(user).model_dump(mode="json") if user is not None else None
            if user is not None and conversation.title == NEW_CHAT_TITLE:
                crud.update_conversation(session, conversation, {"title": auto_title(user.content)})
        except crud.AnswerStreaming:
            # Another replica's turn passed the check above at the same moment and wrote first; the
            # database refused this one (migration 0004) and nothing of it was stored.
            job.cancel()
            active.release(conversation.id)
            raise ConversationBusy(BUSY) from None
        except BaseException:
            job.cancel()
            active.release(conversation.id)
            raise
        answer = AnswerStream(
            sessions=self.sessions,
            active=active,
            metrics=self.metrics,
            conversation_id=conversation.id,
            assistant_id=assistant.id,
            public_id=assistant.public_id,
            user_message=user_public,
            plan=plan,
            job=job,
            model_name=slot.name,
            flush_seconds=self.settings.stream_flush_seconds,
            text=prior[0],
            prior_tokens=prior[1],
            prior_ms=prior[2],
        )
        active.attach(conversation.id, answer)
        response = answer.response()  # this request follows it from the start
        try:
            anyio.from_thread.run_sync(answer.launch)  # on the event loop: the task outlives this request
        except BaseException:
            job.cancel()
            active.release(conversation.id)
            crud.write_message(self.sessions, assistant.id, status=STATUS_INTERRUPTED, finish_reason="cancelled")
            raise
        return response
