"""Streaming an answer into a conversation: generated in the background, followed over SSE.

An answer is not tied to the request that asked for it. :class:`AnswerStream` runs as a task of
the event loop: it reads the engine's chunks, keeps the message row current and hands every
event to whoever follows the answer. The request that started it follows it first; a client
that leaves (another conversation opened, the tab closed) only stops following, and the answer
is written to the end. A client that comes back follows it again
(``GET /api/v1/conversations/{id}/answer``) from the text so far; on another replica, where there
is no AnswerStream to join, :class:`RowFollower` follows the answer's row. Only ``POST .../stop``,
deleting the conversation, or a server shutdown stop an answer; each leaves it "interrupted"
with its text so far, and startup marks rows a killed server left "streaming" as "interrupted".

Nothing is lost: the user's message and the answer's row are committed before generation
starts, and the row is rewritten every ``stream_flush_seconds`` in a short transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.db import crud
from app.db.models import STATUS_COMPLETE, STATUS_ERROR, STATUS_INTERRUPTED, STATUS_STREAMING, Message
from app.metrics import Metrics
from app.schemas import MessagePublic
from app.services.prompts import PromptPlan
from app.services.workers import ChatJob
from core.serving import Queued

logger = logging.getLogger("scratchgpt.chat")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE_SECONDS = 15.0
# How long a stopping server waits for its answers to write their last state.
DRAIN_SECONDS = 10.0


def sse(event: str, data: Any) -> str:
    """One Server-Sent Event; data is JSON (which has no raw newlines, so one data line)."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class ActiveGenerations:
    """The answer each conversation is generating now: a second send answers 409, stop and a
    returning client find it here, and app.services.cancellation watches its row for a stop or a
    delete that another process received."""

    def __init__(self) -> None:
        self._answers: dict[str, AnswerStream | None] = {}
        self._lock = threading.Lock()

    def claim(self, conversation_id: str) -> bool:
        with self._lock:
            if conversation_id in self._answers:
                return False
            self._answers[conversation_id] = None
            return True

    def attach(self, conversation_id: str, answer: AnswerStream) -> None:
        with self._lock:
            self._answers[conversation_id] = answer

    def release(self, conversation_id: str) -> None:
        with self._lock:
            self._answers.pop(conversation_id, None)

    def is_active(self, conversation_id: str) -> bool:
        with self._lock:
            return conversation_id in self._answers

    def watched(self) -> dict[int, ChatJob]:
        """The answer rows being generated here (internal ids), with their jobs."""
        with self._lock:
            return {a.assistant_id: a.job for a in self._answers.values() if a is not None}

    def get(self, conversation_id: str) -> AnswerStream | None:
        with self._lock:
            return self._answers.get(conversation_id)

    def stop(self, conversation_id: str) -> bool:
        answer = self.get(conversation_id)
        if answer is None:
            return False
        answer.job.cancel()
        return True

    def cancel_all(self) -> None:
        with self._lock:
            answers = [answer for answer in self._answers.values() if answer is not None]
        for answer in answers:
            answer.job.cancel()

    async def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Wait (after :meth:`cancel_all`) for the running answers to store their last state."""
        with self._lock:
            tasks = [a.task for a in self._answers.values() if a is not None and a.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


class ManagedStream(StreamingResponse):
    """A StreamingResponse that always runs ``on_close``, even if its body never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


@dataclass
class AnswerStream:
    """Drives one answer in the background and hands its events to the clients that follow it.

    When an answer is continued (``prior_*``), its row already holds text: the new tokens are
    appended to it, and the counts and time add up.
    """

    sessions: sessionmaker[Session]
    active: ActiveGenerations
    metrics: Metrics
    conversation_id: str
    assistant_id: int  # the row (internal id)
    public_id: str  # what clients see
    user_message: dict[str, Any] | None
    plan: PromptPlan
    job: ChatJob  # already queued in the chat engine
    model_name: str
    flush_seconds: float = 0.5
    text: str = ""  # the answer so far (when continuing, what it had before)
    prior_tokens: int = 0
    prior_ms: float = 0.0
    status: str = STATUS_STREAMING
    task: asyncio.Task | None = None
    waiting: int | None = None  # answers ahead in the engine's queue, while it waits
    _followers: list[asyncio.Queue[str | None]] = field(default_factory=list)

    # --- following --------------------------------------------------------------------

    def start_data(self) -> dict[str, Any]:
        start: dict[str, Any] = {
            "conversation_id": self.conversation_id,
            "assistant_message_id": self.public_id,
            "prompt_tokens": len(self.plan.prompt_ids),
            "max_new_tokens": self.plan.max_new_tokens,
            "dropped_messages": self.plan.dropped_messages,
            "model": self.model_name,
        }
        if self.user_message is not None:
            start["user_message"] = self.user_message
        return start

    def follow(self, late: bool = False) -> asyncio.Queue[str | None]:
        """A new follower's queue of SSE strings (None ends it). A ``late`` one (a client that came
        back) gets the text so far as its first delta; the first follower is there before any text.
        Called on the event loop, or before :meth:`launch`: no event can slip between the two."""
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        queue.put_nowait(sse("start", self.start_data()))
        if late and self.waiting is not None and not self.text:
            queue.put_nowait(sse("queued", {"ahead": self.waiting}))
        if late and self.text:
            queue.put_nowait(sse("delta", {"text": self.text}))
        self._followers.append(queue)
        return queue

    def unfollow(self, queue: asyncio.Queue[str | None]) -> None:
        if queue in self._followers:
            self._followers.remove(queue)

    async def relay(self, queue: asyncio.Queue[str | None]) -> AsyncIterator[str]:
        """One follower's events until the answer ends; a keep-alive comment when it goes quiet."""
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see traffic
                continue
            if item is None:
                return
            yield item

    def response(self, late: bool = False) -> ManagedStream:
        queue = self.follow(late)

        async def stop_following() -> None:
            self.unfollow(queue)

        return ManagedStream(self.relay(queue), on_close=stop_following)

    def _publish(self, event: str, data: Any) -> None:
        message = sse(event, data)
        for queue in self._followers:
            queue.put_nowait(message)

    # --- producing --------------------------------------------------------------------

    def launch(self) -> None:
        """Start generating on the running event loop (the task outlives the request)."""
        self.task = asyncio.get_running_loop().create_task(self._produce(), name=f"answer {self.public_id}")

    def _final_fields(self, status: str, **extra: Any) -> dict[str, Any]:
        tokens = self.prior_tokens + self.job.completion_tokens
        ms = self.prior_ms + self.job.generation_seconds * 1000
        return dict(
            content=self.text,
            status=status,
            prompt_tokens=self.job.prompt_tokens,  # a remote backend's own count replaces our estimate
            completion_tokens=tokens,
            duration_ms=round(ms, 1),
            tokens_per_second=round(tokens / (ms / 1000), 2) if ms > 0 else None,
            **extra,
        )

    async def _produce(self) -> None:
        try:
            await self._generate()
        except asyncio.CancelledError:
            # The event loop is going away under a running answer: keep what it wrote.
            self.job.cancel()
            self.status = STATUS_INTERRUPTED
            crud.write_message(self.sessions, self.assistant_id,
                               **self._final_fields(STATUS_INTERRUPTED, finish_reason="cancelled"))
            self.active.release(self.conversation_id)
            self._end()
            raise

    async def _generate(self) -> None:
        last_flush = time.perf_counter()
        try:
            async for chunk in self.job.events():
                if chunk is None:
                    continue
                if isinstance(chunk, Queued):  # still waiting for a slot: how many answers go first
                    self.waiting = chunk.ahead
                    self._publish("queued", {"ahead": chunk.ahead})
                    continue
                self.waiting = None
                if chunk.text:
                    self.text += chunk.text
                    self._publish("delta", {"text": chunk.text})
                if time.perf_counter() - last_flush >= self.flush_seconds:
                    last_flush = time.perf_counter()
                    await run_in_threadpool(
                        crud.write_message, self.sessions, self.assistant_id,
                        content=self.text, completion_tokens=self.prior_tokens + self.job.completion_tokens,
                    )
        except Exception as exc:
            self.status = STATUS_ERROR
            message = f"generation failed: {type(exc).__name__}: {exc}"
            await run_in_threadpool(
                crud.write_message, self.sessions, self.assistant_id, **self._final_fields(STATUS_ERROR, error=message)
            )
            self.metrics.generations.labels("chat", "error").inc()
            self.active.release(self.conversation_id)
            self._publish("error", {"detail": message, "message": self._public()})
            self._end()
            return
        reason = self.job.finish_reason or "stop"
        self.status = STATUS_INTERRUPTED if reason == "cancelled" else STATUS_COMPLETE
        fields = self._final_fields(self.status, finish_reason=reason)
        await run_in_threadpool(crud.write_message, self.sessions, self.assistant_id, **fields)
        self.metrics.generations.labels("chat", reason).inc()
        # Released before "done" goes out: a client may send its next message as soon as it reads it.
        self.active.release(self.conversation_id)
        if reason == "cancelled":
            logger.info("answer stopped", extra={"conversation_id": self.conversation_id, "message_id": self.public_id})
        self._publish(
            "done",
            {
                "message": self._public(**fields),
                "prompt_tokens": self.job.prompt_tokens,
                "cached_prompt_tokens": self.job.cached_prompt_tokens,
                "completion_tokens": fields["completion_tokens"],
                "tokens_per_second": fields["tokens_per_second"],
                "duration_ms": fields["duration_ms"],
                "finish_reason": reason,
                "dropped_messages": self.plan.dropped_messages,
            },
        )
        self._end()

    def _end(self) -> None:
        for queue in self._followers:
            queue.put_nowait(None)

    def _public(self, **fields: Any) -> dict[str, Any]:
        return {
            "id": self.public_id,
            "role": "assistant",
            "content": self.text,
            "status": self.status,
            "prompt_tokens": self.job.prompt_tokens,
            "dropped_messages": self.plan.dropped_messages,
            **{k: v for k, v in fields.items() if k != "content"},
        }


# --- following an answer that another process generates --------------------------------


@dataclass
class RowFollower:
    """Follows, from its row, an answer that another replica generates (nothing of it is in this process).

    The same events as a late follower of an :class:`AnswerStream`: ``start``, the text so far as
    the first ``delta``, then each piece the generating replica flushes into the row (every
    ``stream_flush_seconds``, which is also how often the row is read here), and ``done`` (or
    ``error``) with the stored message once the row is no longer "streaming". What the row does not
    hold is missing: no ``queued`` events, ``cached_prompt_tokens`` is null, ``max_new_tokens`` is
    the conversation's limit rather than the plan's, and ``start`` carries no ``user_message``.

    A stop leaves the row "interrupted" before the generating replica writes its last text (at its
    next poll); the follower waits for that write (the row's ``finish_reason``, or its error) up to
    ``settle_seconds``, the lease after which a replica that wrote nothing counts as dead
    (app.services.cancellation), and then ends with the row as it is.
    """

    sessions: sessionmaker[Session]
    row: Message  # as read when following began
    start: dict[str, Any]
    poll_seconds: float
    settle_seconds: float

    async def events(self) -> AsyncIterator[str]:
        row, text = self.row, self.row.content
        yield sse("start", self.start)
        if text:
            yield sse("delta", {"text": text})
        heard = time.monotonic()
        left_streaming: float | None = None
        while True:
            await asyncio.sleep(self.poll_seconds)
            now = await run_in_threadpool(crud.read_message, self.sessions, row.id)
            if now is None:  # deleted with its conversation (the generating replica stops at its next poll)
                yield sse("error", {"detail": "the answer was deleted while it was being generated",
                                    "message": self._public(row)})
                return
            row = now
            # The row only grows while it streams (a continued answer keeps its start).
            if row.content != text and row.content.startswith(text):
                yield sse("delta", {"text": row.content[len(text):]})
                text, heard = row.content, time.monotonic()
            if row.status != STATUS_STREAMING:
                written = row.finish_reason is not None or row.status == STATUS_ERROR
                left_streaming = left_streaming if left_streaming is not None else time.monotonic()
                if written or time.monotonic() - left_streaming >= self.settle_seconds:
                    yield self._final(row)
                    return
            if time.monotonic() - heard >= KEEPALIVE_SECONDS:
                yield ": keep-alive\n\n"
                heard = time.monotonic()

    def _public(self, row: Message) -> dict[str, Any]:
        return MessagePublic.model_validate(row).model_dump(mode="json")

    def _final(self, row: Message) -> str:
        message = self._public(row)
        if row.status == STATUS_ERROR:
            return sse("error", {"detail": row.error or "generation failed", "message": message})
        return sse("done", {
            "message": message,
            "prompt_tokens": row.prompt_tokens,
            "cached_prompt_tokens": None,  # the generating replica's engine knew; the row does not
            "completion_tokens": row.completion_tokens,
            "tokens_per_second": row.tokens_per_second,
            "duration_ms": row.duration_ms,
            # An "interrupted" row that its replica never finished (dead within the lease): stopped.
            "finish_reason": row.finish_reason or "cancelled",
            "dropped_messages": row.dropped_messages,
        })

    def response(self) -> StreamingResponse:
        return StreamingResponse(self.events(), media_type="text/event-stream", headers=SSE_HEADERS)
