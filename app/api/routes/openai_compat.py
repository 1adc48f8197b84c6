"""An OpenAI-compatible API: ``GET /v1/models`` and ``POST /v1/chat/completions`` (stream and not).

Every chat model the service holds is listed (the default first); ``model`` picks one. A name not
served is a 404 that lists the served ones; a served model that is not ready (loading, or its
checkpoint not made yet) a 503 with ``Retry-After``. Sampling settings a request leaves out take
the model's decoding defaults (its checkpoint's ``generation_defaults``), then OpenAI's.

Enough of the Chat Completions contract for the official ``openai`` client and tools built on
it: messages, temperature, top_p, frequency_penalty, presence_penalty, max_tokens (or max_completion_tokens),
stop, seed, stream,
``stream_options.include_usage``. Unknown fields are accepted and ignored, as OpenAI's clients
send ones we do not implement. Errors use OpenAI's ``{"error": {...}}`` shape.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from app.api.deps import ApiOwnerDep, ModelsDep, SettingsDep, require_api_access
from app.schemas import Bool, Int, Penalty, RepetitionPenalty, Seed, Temperature, Text, TopK, TopP, bounded
from app.services.prompts import PromptTooLong, generation_config, plan_prompt, sent_messages
from app.services.registry import NO_PENALTIES, ModelSlot, ModelUnavailable, UnknownModel
from app.services.streaming import ManagedStream
from app.services.remote_chat import BackendError
from app.services.workers import OwnerBusy, ServerBusy
from core.generation.generate import StreamChunk

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_access)])


class OpenAIError(Exception):
    """Rendered as OpenAI's error object by the handler in app.main."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class OpenAIErrorBody(BaseModel):
    error: dict[str, Any]


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIErrorBody, "description": "Invalid request (e.g. prompt over the context window)"},
    401: {"model": OpenAIErrorBody, "description": "Missing or invalid API key"},
    404: {"model": OpenAIErrorBody, "description": "Unknown model"},
    422: {"model": OpenAIErrorBody, "description": "Invalid request body"},
    500: {"model": OpenAIErrorBody, "description": "Generation failed"},
    429: {"model": OpenAIErrorBody, "description": "This API key has as many answers waiting as it may (Retry-After)"},
    503: {"model": OpenAIErrorBody, "description": "The chat model is loading or missing, or its queue is full (Retry-After)"},
}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise OpenAIError(400, f"content part of type {part.type!r} is not supported; send text", param="messages")
            parts.append(part.text)
        return "".join(parts)


MAX_STOP = 4  # OpenAI's limit


def _stop_count(value: Any) -> Any:
    # Before the union is tried: past the limit, each member's failure would be reported instead
    # (the string member's first), and none of them says what is wrong.
    if isinstance(value, list) and len(value) > MAX_STOP:
        raise PydanticCustomError("too_many_stops", "at most {limit} stop sequences are allowed; got {count}",
                                  {"limit": MAX_STOP, "count": len(value)})
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: Bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Text
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = Field(None, description="Extension: top-k filtering")
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = Field(None, description="Extension: CTRL's repetition penalty")
    max_tokens: bounded(Int, ge=1) | None = None
    max_completion_tokens: bounded(Int, ge=1) | None = None
    stop: Annotated[Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None, BeforeValidator(_stop_count)] = Field(
        None, description=f"Up to {MAX_STOP} strings that end the answer")
    seed: Seed | None = None
    n: bounded(Int, ge=1, le=1) | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "scratchgpt"
    state: str = Field("ready", description="Extension: ready, loading, missing, error or disabled")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get("/models", response_model=ModelList, responses=ERRORS)
def list_models(models: ModelsDep) -> ModelList:
    """The chat models, the default first (what a client that takes the first one should use)."""
    default = models.default_chat()
    slots = [default, *(slot for slot in models.chat.values() if slot is not default)]
    return ModelList(data=[ModelCard(id=slot.name, created=int(slot.path.stat().st_mtime) if slot.path.exists() else 0,
                                     state=slot.state) for slot in slots])


# Seconds a client should wait before asking a model that is not ready again: one loading is
# there in seconds; one whose checkpoint is still to be made (a fine-tuning job) in minutes.
RETRY_LOADING, RETRY_NOT_READY = 5, 60


def chat_model(models: Any, name: str) -> ModelSlot:
    """The served chat model ``name``: 404 if it is not one, 503 with Retry-After if it is not ready."""
    try:
        return models.require_chat(name)
    except UnknownModel as exc:
        raise OpenAIError(404, str(exc), code="model_not_found", param="model") from None
    except ModelUnavailable as exc:
        retry = RETRY_LOADING if exc.state == "loading" else RETRY_NOT_READY
        raise OpenAIError(503, exc.detail, type_="server_error", code=f"model_{exc.state}",
                          headers={"Retry-After": str(retry)}) from None


def sampling(slot: ModelSlot, body: "ChatCompletionRequest") -> dict[str, Any]:
    """The request's sampling settings; those it leaves out, the model's defaults, then OpenAI's."""
    chosen = {key: value for key in ("temperature", "top_p", "top_k", *NO_PENALTIES)
              if (value := getattr(body, key)) is not None}
    return {"temperature": 1.0, "top_p": None, "top_k": None, **NO_PENALTIES, **slot.defaults, **chosen}


def _split_messages(messages: list[ChatMessage]) -> tuple[str, list[dict[str, str]]]:
    system = [m.text() for m in messages if m.role in ("system", "developer")]
    turns = [{"role": m.role, "content": m.text()} for m in messages if m.role in ("user", "assistant")]
    if not turns:
        raise OpenAIError(400, "messages must include at least one user message", param="messages")
    return "\n\n".join(system), turns


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    # prompt_tokens_details.cached_tokens: as OpenAI reports its own prompt caching; here the prompt
    # tokens taken from a kept cache (core.fast.prefix_cache) instead of prefilled.
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _collect(job: Any) -> str:
    return "".join([c.text async for c in job.events() if isinstance(c, StreamChunk)])


async def _client_gone(request: Request) -> None:
    """Returns when the client closes its connection (the body was read, so the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post(
    "/chat/completions",
    responses={
        **ERRORS,
        200: {
            "description": "A chat.completion object, or with stream=true Server-Sent Events of chat.completion.chunk",
            "content": {
                "application/json": {},
                # One event: a data line holding a chunk's JSON, or the closing "[DONE]".
                "text/event-stream": {
                    "itemSchema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
                },
            },
        },
    },
)
async def chat_completions(
    body: ChatCompletionRequest, models: ModelsDep, settings: SettingsDep, request: Request, owner: ApiOwnerDep
) -> Any:
    slot = chat_model(models, body.model)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    requested = body.max_completion_tokens or body.max_tokens
    if requested is not None and requested > settings.max_new_tokens_cap:
        raise OpenAIError(
            400, f"max_tokens {requested} is over this server's limit {settings.max_new_tokens_cap}", param="max_tokens"
        )
    system, turns = _split_messages(body.messages)
    total_chars = len(system) + sum(len(t["content"]) for t in turns)
    if total_chars > settings.max_message_chars * 4:
        raise OpenAIError(400, f"messages hold {total_chars} characters; the limit is {settings.max_message_chars * 4}")
    checkpoint = slot.checkpoint
    try:
        plan = plan_prompt(checkpoint, system, turns, requested or settings.max_new_tokens_cap, allow_drop=False)
    except PromptTooLong as exc:
        raise OpenAIError(400, str(exc), code="context_length_exceeded", param="messages") from None
    config = generation_config(checkpoint, max_new_tokens=plan.max_new_tokens, seed=body.seed, extra_stop=stops,
                               **sampling(slot, body))
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    worker = slot.worker

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": slot.name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    # Queued now, so that a refusal is this request's status (429, 503), not an error inside a stream.
    try:
        job = worker.submit(plan.prompt_ids, config, owner=owner.id if owner is not None else None,
                            messages=sent_messages(plan))
    except (OwnerBusy, ServerBusy) as exc:
        raise OpenAIError(429 if isinstance(exc, OwnerBusy) else 503, str(exc), type_="rate_limit_exceeded",
                          headers={"Retry-After": str(exc.retry_after)}) from None

    if not body.stream:
        answer = asyncio.ensure_future(_collect(job))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            # A client that gives up frees the model at once: its answer stops being generated.
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():
                job.cancel()
                answer.cancel()
                return Response(status_code=499)  # nobody reads it; as nginx logs a client that closed
            text = answer.result()
        except OpenAIError:
            raise
        except BackendError as exc:  # an external engine failed: what a gateway answers (502, 503, 504)
            raise OpenAIError(exc.status, f"generation failed: {exc}", type_="server_error") from None
        except Exception as exc:
            raise OpenAIError(500, f"generation failed: {type(exc).__name__}: {exc}", type_="server_error") from exc
        finally:
            job.cancel()
            gone.cancel()
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": slot.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": job.finish_reason or "stop"}],
            "usage": _usage(job.prompt_tokens, job.completion_tokens, job.cached_prompt_tokens),
        }

    async def events() -> Any:
        yield f"data: {json.dumps(chunk({'role': 'assistant', 'content': ''}, None))}\n\n"
        try:
            async for piece in job.events():
                if isinstance(piece, StreamChunk) and piece.text:
                    yield f"data: {json.dumps(chunk({'content': piece.text}, None), ensure_ascii=False)}\n\n"
        except Exception as exc:
            error = {"error": {"message": f"generation failed: {exc}", "type": "server_error"}}
            yield f"data: {json.dumps(error)}\n\n"
            return
        yield f"data: {json.dumps(chunk({}, job.finish_reason or 'stop'))}\n\n"
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = {**chunk({}, None), "choices": [], "usage": _usage(job.prompt_tokens, job.completion_tokens,
                                                                         job.cached_prompt_tokens)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"

    async def close() -> None:
        job.cancel()

    return ManagedStream(events(), on_close=close)
