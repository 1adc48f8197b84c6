"""One chat turn: the question kept, the prompt fitted into the window, the answer started.

:meth:`ChatService.start_answer` is what sending a message and regenerating the last answer
both run. In order: the chat model must be serving; the conversation is claimed (one answer
at a time); its stored messages become the model's turns and are fitted into the context
window (``app.services.prompts``); only then is anything written: the replaced answer
deleted, the user's message committed (whatever happens next, the question is kept), and the
answer's row created as "streaming". The answer is queued in the chat engine before anything is
written, so a refusal leaves the conversation as it was. :class:`app.services.streaming.AnswerStream`
takes it from there. A refusal is an error of its own (:class:`ConversationBusy`,
:class:`NothingToAnswer`, :class:`app.services.prompts.PromptTooLong`, and the engine's limits
:class:`app.services.workers.OwnerBusy` and :class:`~app.services.workers.ServerBusy`), which the
route turns into an HTTP status; this module knows nothing of requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from app.db import crud
from app.db.models import STATUS_STREAMING, Conversation
from app.metrics import Metrics
from app.schemas import MessagePublic
from app.services.prompts import conversation_turns, generation_config, plan_prompt
from app.services.registry import CHAT, ModelRegistry, ModelSlot, ModelUnavailable, UnknownModel
from app.services.streaming import ActiveGenerations, AnswerStream, ManagedStream
from app.settings import Settings

NEW_CHAT_TITLE = "New chat"


class ConversationBusy(RuntimeError):
    """An answer is already being generated in this conversation."""


class NothingToAnswer(ValueError):
    """The conversation does not end with a user message, so there is no question to answer."""


def auto_title(text: str) -> str:
    """A new chat's title: its first message on one line, cut to 60 characters."""
    words = " ".join(text.split())
    return words if len(words) <= 60 else words[:57].rstrip() + "..."


@dataclass
class ChatService:
    """What a chat turn needs of the app: the request's database session and the sessions that
    outlive it (the stream writes after the request has returned), the answers in progress,
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
        new_user_message: str | None,
        seed: int | None,
        replace_last_answer: bool = False,
    ) -> ManagedStream:
        """Store ``new_user_message`` (None: answer the last one again) and stream the answer to it.

        With ``replace_last_answer`` the conversation's last answer, if it ends the conversation,
        is deleted once the new prompt is known to fit.
        """
        slot = self.chat_model(conversation)
        checkpoint = slot.checkpoint
        session, active = self.session, self.active
        if not active.claim(conversation.id):
            raise ConversationBusy("an answer is already being generated in this conversation; stop it first")
        try:
            messages = crud.list_messages(session, conversation.id)
            if any(m.status == STATUS_STREAMING for m in messages):  # another replica is answering here
                raise ConversationBusy("an answer is already being generated in this conversation; stop it first")
            replaced = messages.pop() if replace_last_answer and messages and messages[-1].role == "assistant" else None
            history = conversation_turns(messages)
            if new_user_message is not None:
                history.append({"role": "user", "content": new_user_message})
            if not history or history[-1]["role"] != "user":
                raise NothingToAnswer("the conversation does not end with a user message; send one first")
            max_new = min(conversation.max_new_tokens, self.settings.max_new_tokens_cap)
            plan = plan_prompt(checkpoint, conversation.system_prompt, history, max_new)
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
            job = slot.worker.submit(plan.prompt_ids, config, owner=owner)
        except BaseException:
            active.release(conversation.id)
            raise
        try:
            if replaced is not None:
                crud.delete_message(session, replaced)
            user_public = None
            if new_user_message is not None:
                # Stored before generation starts: whatever happens next, the question is kept.
                user = crud.add_message(session, conversation.id, "user", new_user_message)
                user_public = MessagePublic.model_validate(user).model_dump(mode="json")
                if conversation.title == NEW_CHAT_TITLE:
                    crud.update_conversation(session, conversation, {"title": auto_title(new_user_message)})
            assistant = crud.add_message(
                session, conversation.id, "assistant", "",
                status=STATUS_STREAMING, prompt_tokens=len(plan.prompt_ids), dropped_messages=plan.dropped_messages,
            )
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
            user_message=user_public,
            plan=plan,
            job=job,
            model_name=slot.name,
            flush_seconds=self.settings.stream_flush_seconds,
        )
        return ManagedStream(answer.events(), on_close=answer.close)
