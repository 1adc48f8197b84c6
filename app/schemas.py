"""Request and response bodies of the REST API.

Request types are strict where JSON Schema is: ``true`` is not an integer and ``"0.5"`` is not a
number, so what the OpenAPI document promises is exactly what the server accepts.
Unknown fields in our own API are rejected (a typo in a setting should not pass silently).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool


def _number_only(value: Any) -> Any:
    if isinstance(value, (bool, str)):
        raise ValueError("must be a JSON number")
    return value


def _integer_only(value: Any) -> Any:
    if isinstance(value, (bool, str)):
        raise ValueError("must be a JSON integer")
    return value


def _text_only(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be a JSON string")
    return value


def _as_utc(value: datetime) -> datetime:
    # The database keeps naive UTC; the API says so explicitly (RFC 3339 with an offset).
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


UTCDateTime = Annotated[datetime, AfterValidator(_as_utc)]

# Whitespace as JSON Schema's "\s" (ECMA-262) means it, spelled out so that the schema, pydantic
# (Rust regex) and Python read one pattern alike: their own "\s" and str.strip() differ (Python
# strips "\x1c"-"\x1f" and "\x85", which a client reading the schema takes for text).
BLANK_CLASS = r"[\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
HAS_TEXT = "[^" + BLANK_CLASS[1:]  # a pattern that finds one character that is not whitespace
_EDGES = re.compile(f"^{BLANK_CLASS}+|{BLANK_CLASS}+$")


def is_blank(text: str) -> bool:
    return re.search(HAS_TEXT, text) is None


def strip_blank(text: str) -> str:
    return _EDGES.sub("", text)


# Constraints come before the strictness validator: that order keeps them in the JSON Schema
# (minimum, maxLength...) instead of pydantic-only keys a client cannot read.
Int = Annotated[int, BeforeValidator(_integer_only)]
Float = Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_number_only)]
Text = Annotated[str, BeforeValidator(_text_only)]
Bool = StrictBool

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False, description="0 means greedy decoding"),
                        BeforeValidator(_number_only)]
TopK = Annotated[int, Field(ge=1, le=1000), BeforeValidator(_integer_only)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False), BeforeValidator(_number_only)]
MaxNewTokens = Annotated[int, Field(ge=1, le=32768), BeforeValidator(_integer_only)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="Sampling seed, for repeatable answers"),
                 BeforeValidator(_integer_only)]
Title = Annotated[str, Field(min_length=1, max_length=200), BeforeValidator(_text_only)]
SystemPrompt = Annotated[str, Field(max_length=8000), BeforeValidator(_text_only)]
# Not empty and not only whitespace (a pattern is a search: somewhere a non-space character).
NonBlank = Annotated[str, Field(min_length=1, pattern=HAS_TEXT), BeforeValidator(_text_only)]


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- classification ---------------------------------------------------------------


class ClassifyRequest(RequestModel):
    text: NonBlank = Field(description="The message to classify", examples=["WINNER! Claim your free prize now"])


class ClassifyBatchRequest(RequestModel):
    texts: list[NonBlank] = Field(min_length=1, description="Messages to classify, in order")


class ClassifyResult(BaseModel):
    label: Literal["spam", "ham"]
    spam_probability: float
    model: str


class ClassifyBatchResult(BaseModel):
    results: list[ClassifyResult]


# --- conversations ----------------------------------------------------------------


class ConversationCreate(RequestModel):
    title: Title | None = None
    system_prompt: SystemPrompt | None = None
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    max_new_tokens: MaxNewTokens | None = None


class ConversationUpdate(RequestModel):
    """Fields to change (absent ones stay); ``top_k``/``top_p`` may be null to switch that filter off."""

    # Not nullable: leaving a field out keeps it, sending null is an error.
    title: Title = Field(default=None)  # type: ignore[assignment]
    system_prompt: SystemPrompt = Field(default=None)  # type: ignore[assignment]
    temperature: Temperature = Field(default=None)  # type: ignore[assignment]
    top_k: TopK | None = None
    top_p: TopP | None = None
    max_new_tokens: MaxNewTokens = Field(default=None)  # type: ignore[assignment]


class ConversationPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    title: str
    model: str
    system_prompt: str
    temperature: float
    top_k: int | None
    top_p: float | None
    max_new_tokens: int
    created_at: UTCDateTime
    updated_at: UTCDateTime


class MessagePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    role: str
    content: str
    status: str
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    duration_ms: float | None = None
    tokens_per_second: float | None = None
    finish_reason: str | None = None
    dropped_messages: int = 0
    created_at: UTCDateTime


class ConversationDetail(ConversationPublic):
    messages: list[MessagePublic]
    generating: bool = False


class ConversationList(BaseModel):
    conversations: list[ConversationPublic]
    total: int


class MessageCreate(RequestModel):
    content: NonBlank = Field(description="The user's message")
    seed: Seed | None = None


class RegenerateRequest(RequestModel):
    seed: Seed | None = None


class StopResult(BaseModel):
    stopped: bool


# --- service ----------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    loading: list[str]
    models: dict[str, dict[str, Any]]


class ErrorBody(BaseModel):
    detail: Any


# Documented on every route: what the middleware and validation can answer.
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed request body"},
    422: {"model": ErrorBody, "description": "Invalid request: a list of field errors, or a message naming the limit"},
    401: {"model": ErrorBody, "description": "Missing or invalid API key, or an expired session"},
    403: {"model": ErrorBody, "description": "Missing or wrong CSRF token on a cookie-authenticated change"},
    413: {"model": ErrorBody, "description": "Request body over the size limit"},
}
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorBody, "description": "The model is loading, missing (the detail names the command that makes it) or failed to load"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such conversation for this owner"},
}
