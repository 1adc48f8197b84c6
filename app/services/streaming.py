"""Streaming an answer into a conversation: SSE events out, the message row kept current.

Nothing is lost: the user's message is committed before generation starts; the answer row
is created as "streaming" and rewritten every ``stream_flush_seconds`` in a short transaction;
a stop, a client disconnect or a server shutdown leaves it "interrupted" with the text so far,
and startup marks rows a killed server left "streaming" as "interrupted".
"""

from __future__ import annotations

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
from app.db.models import STATUS_COMPLETE, STATUS_ERROR, STATUS_INTERRUPTED, STATUS_STREAMING
from app.metrics import Metrics
from app.services.prompts import PromptPlan
from app.services.workers import ChatJob
from core.serving import Queued

logger = logging.getLogger("scratchgpt.chat")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE_SECONDS = 15.0


def sse(event: str, data: Any) -> str:
    """One Server-Sent Event; data is JSON (which has no raw newlines, so one data line)."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class ActiveGenerations:
    """Which conversation is generating now, so a second send answers 409 and stop can find the job;
    and which answer row each job writes, which app.services.cancellation watches for a stop or a
    delete that another process received."""

    def __init__(self) -> None:
        self._jobs: dict[str, ChatJob | None] = {}
        self._rows: dict[str, int] = {}
        self._lock = threading.Lock()

    def claim(self, conversation_id: str) -> bool:
        with self._lock:
            if conversation_id in self._jobs:
                return False
            self._jobs[conversation_id] = None
            return True

    def attach(self, conversation_id: str, job: ChatJob, message_id: int | None = None) -> None:
        with self._lock:
            self._jobs[conversation_id] = job
            if message_id is not None:
                self._rows[conversation_id] = message_id

    def release(self, conversation_id: str) -> None:
        with self._lock:
            self._jobs.pop(conversation_id, None)
            self._rows.pop(conversation_id, None)

    def watched(self) -> dict[int, ChatJob]:
        """The answer rows being generated here, with their jobs."""
        with self._lock:
            return {row: job for cid, row in self._rows.items() if (job := self._jobs.get(cid)) is not None}

    def is_active(self, conversation_id: str) -> bool:
        with self._lock:
            return conversation_id in self._jobs

    def stop(self, conversation_id: str) -> bool:
        with self._lock:
            job = self._jobs.get(conversation_id)
        if job is None:
            return False
        job.cancel()
        return True

    def cancel_all(self) -> None:
        with self._lock:
            jobs = [job for job in self._jobs.values() if job is not None]
        for job in jobs:
            job.cancel()


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
    """Drives one answer: submits the job, relays chunks as SSE, keeps the row up to date."""

    sessions: sessionmaker[Session]
    active: ActiveGenerations
    metrics: Metrics
    conversation_id: str
    assistant_id: int
    user_message: dict[str, Any] | None
    plan: PromptPlan
    job: ChatJob  # already queued in the chat engine
    model_name: str
    flush_seconds: float = 0.5
    text: str = ""
    status: str = STATUS_STREAMING
    started: float = field(default_factory=time.perf_counter)

    def _final_fields(self, status: str, **extra: Any) -> dict[str, Any]:
        tokens = self.job.completion_tokens
        seconds = self.job.generation_seconds
        return dict(
            content=self.text,
            status=status,
            completion_tokens=tokens,
            duration_ms=round(seconds * 1000, 1),
            tokens_per_second=round(tokens / seconds, 2) if seconds > 0 else None,
            **extra,
        )

    async def events(self) -> AsyncIterator[str]:
        start: dict[str, Any] = {
            "conversation_id": self.conversation_id,
            "assistant_message_id": self.assistant_id,
            "prompt_tokens": len(self.plan.prompt_ids),
            "max_new_tokens": self.plan.max_new_tokens,
            "dropped_messages": self.plan.dropped_messages,
            "model": self.model_name,
        }
        if self.user_message is not None:
            start["user_message"] = self.user_message
        yield sse("start", start)
        self.active.attach(self.conversation_id, self.job, self.assistant_id)
        last_flush = time.perf_counter()
        try:
            async for chunk in self.job.events(heartbeat=KEEPALIVE_SECONDS):
                if chunk is None:
                    yield ": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see traffic
                    continue
                if isinstance(chunk, Queued):  # still waiting for a slot: how many answers go first
                    yield sse("queued", {"ahead": chunk.ahead})
                    continue
                if chunk.text:
                    self.text += chunk.text
                    yield sse("delta", {"text": chunk.text})
                if time.perf_counter() - last_flush >= self.flush_seconds:
                    last_flush = time.perf_counter()
                    await run_in_threadpool(
                        crud.write_message, self.sessions, self.assistant_id,
                        content=self.text, completion_tokens=self.job.completion_tokens,
                    )
        except Exception as exc:
            self.status = STATUS_ERROR
            message = f"generation failed: {type(exc).__name__}: {exc}"
            await run_in_threadpool(
                crud.write_message, self.sessions, self.assistant_id, **self._final_fields(STATUS_ERROR, error=message)
            )
            self.metrics.generations.labels("chat", "error").inc()
            yield sse("error", {"detail": message, "message": self._public()})
            return
        reason = self.job.finish_reason or "stop"
        self.status = STATUS_INTERRUPTED if reason == "cancelled" else STATUS_COMPLETE
        fields = self._final_fields(self.status, finish_reason=reason)
        await run_in_threadpool(crud.write_message, self.sessions, self.assistant_id, **fields)
        self.metrics.generations.labels("chat", reason).inc()
        yield sse(
            "done",
            {
                "message": self._public(**fields),
                "prompt_tokens": len(self.plan.prompt_ids),
                "cached_prompt_tokens": self.job.cached_prompt_tokens,
                "completion_tokens": fields["completion_tokens"],
                "tokens_per_second": fields["tokens_per_second"],
                "duration_ms": fields["duration_ms"],
                "finish_reason": reason,
                "dropped_messages": self.plan.dropped_messages,
            },
        )

    def _public(self, **fields: Any) -> dict[str, Any]:
        return {
            "id": self.assistant_id,
            "role": "assistant",
            "content": self.text,
            "status": self.status,
            "prompt_tokens": len(self.plan.prompt_ids),
            "dropped_messages": self.plan.dropped_messages,
            **{k: v for k, v in fields.items() if k != "content"},
        }

    async def close(self) -> None:
        """Runs when the response ends for any reason: cancel the job, settle the row, free the conversation
        (in that order: a row still "streaming" tells every replica the conversation is busy)."""
        self.job.cancel()
        try:
            await self._settle()
        finally:
            self.active.release(self.conversation_id)

    async def _settle(self) -> None:
        if self.status == STATUS_STREAMING:
            # The client went away (or the server is stopping) mid-answer.
            self.status = STATUS_INTERRUPTED
            self.metrics.generations.labels("chat", "disconnected").inc()
            await run_in_threadpool(
                crud.write_message, self.sessions, self.assistant_id,
                **self._final_fields(STATUS_INTERRUPTED, finish_reason="disconnected"),
            )
            logger.info("answer interrupted", extra={"conversation_id": self.conversation_id,
                                                    "message_id": self.assistant_id})
