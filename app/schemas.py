"""Request and response bodies of the REST API.

Request types are strict where JSON Schema is: ``true`` is not an integer and ``"0.5"`` is not a
number, so what the OpenAPI document promises is exactly what the server accepts.
Unknown fields in our own API are rejected (a typo in a setting should not pass silently).
The services build the response bodies they answer with (the Lab's measurements are these
models, made in ``app.services.lab``), so there is one layer of result types, the contract.
This module imports pydantic only.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, model_validator


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
# Penalties against repeating (core.generation.sampling.Penalties): OpenAI's two, and CTRL's repetition penalty.
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False), BeforeValidator(_number_only)]
RepetitionPenalty = Annotated[float, Field(ge=0.5, le=2.0, allow_inf_nan=False,
                                           description="above 1 discourages tokens already in the conversation"),
                              BeforeValidator(_number_only)]
MaxNewTokens = Annotated[int, Field(ge=1, le=32768), BeforeValidator(_integer_only)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="Sampling seed, for repeatable answers"),
                 BeforeValidator(_integer_only)]
Title = Annotated[str, Field(min_length=1, max_length=200), BeforeValidator(_text_only)]
SystemPrompt = Annotated[str, Field(max_length=8000), BeforeValidator(_text_only)]
# Not empty and not only whitespace (a pattern is a search: somewhere a non-space character).
NonBlank = Annotated[str, Field(min_length=1, pattern=HAS_TEXT), BeforeValidator(_text_only)]




def bounded(strict: Any, **limits: Any) -> Any:
    """``Int`` or ``Float`` with limits, written as ``minimum``/``maximum`` in OpenAPI.

    The limits must come before the strict-type validator: placed after it (``Annotated[Int,
    Field(ge=...)]``), pydantic still enforces them but writes non-standard ``ge``/``le`` keys into
    the schema, which clients and fuzzers do not read.
    """
    return Annotated[(strict.__origin__, Field(**limits), *strict.__metadata__)]


def _not_blank(value: str) -> str:
    if is_blank(value):
        raise ValueError("is empty or only whitespace; type some text")
    return value


def not_blank(max_length: int | None = None) -> Any:
    """``Text`` with a non-space character: the schema says so with a pattern (unanchored in JSON
    Schema, so it means "contains one"), the validator in words. Limits go first, as in ``bounded``."""
    limits = Field(min_length=1, max_length=max_length, json_schema_extra={"pattern": HAS_TEXT})
    return Annotated[(str, limits, *Text.__metadata__, AfterValidator(_not_blank))]


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


ModelName = Annotated[str, Field(min_length=1, max_length=200), BeforeValidator(_text_only)]


class ConversationCreate(RequestModel):
    """Unset settings take the chat model's decoding defaults, then the service's."""

    title: Title | None = None
    model: ModelName | None = Field(None, description="A chat model of GET /api/v1/models; by default the default one")
    system_prompt: SystemPrompt | None = None
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    max_new_tokens: MaxNewTokens | None = None
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None


class ConversationUpdate(RequestModel):
    """Fields to change (absent ones stay); ``top_k``/``top_p`` may be null to switch that filter off."""

    # Not nullable: leaving a field out keeps it, sending null is an error.
    title: Title = Field(default=None)  # type: ignore[assignment]
    system_prompt: SystemPrompt = Field(default=None)  # type: ignore[assignment]
    temperature: Temperature = Field(default=None)  # type: ignore[assignment]
    top_k: TopK | None = None
    top_p: TopP | None = None
    max_new_tokens: MaxNewTokens = Field(default=None)  # type: ignore[assignment]
    repetition_penalty: RepetitionPenalty = Field(default=None)  # type: ignore[assignment]
    frequency_penalty: Penalty = Field(default=None)  # type: ignore[assignment]
    presence_penalty: Penalty = Field(default=None)  # type: ignore[assignment]


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
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    created_at: UTCDateTime
    updated_at: UTCDateTime


class MessagePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    # A stored message's public id (random); the internal row number is never shown.
    id: str = Field(validation_alias=AliasChoices("public_id", "id"))
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
    alternatives: list[str] = Field(
        default_factory=list,
        description="For an answer regenerated before: the ids of every answer to the same question, oldest first, "
        "this one included (select one with POST .../messages/{id}/select); empty otherwise",
    )


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


class Limit(BaseModel):
    minimum: float
    maximum: float
    exclusive_minimum: bool = Field(False, description="The minimum itself is not allowed")


class ChatDefaults(BaseModel):
    system_prompt: str
    temperature: float
    top_k: int | None
    top_p: float | None
    max_new_tokens: int


class ChatSettings(BaseModel):
    """What a conversation's settings may be on this server, and what a new chat gets."""

    limits: dict[str, Limit] = Field(description="Per setting: the range the server accepts")
    max_system_prompt_chars: int
    max_message_chars: int
    defaults: ChatDefaults = Field(description="What a new conversation gets for the settings it does not send")


class StopResult(BaseModel):
    stopped: bool


# --- service ----------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    loading: list[str]
    models: dict[str, dict[str, Any]]
    jobs: list[dict[str, Any]] = Field(default_factory=list, description="background fine-tunes (see /api/v1/jobs)")


class Job(BaseModel):
    """A background fine-tune that makes one of the service's models (``scratchgpt serve`` runs them)."""

    name: str
    title: str
    role: str | None = Field(None, description="the model it makes: chat or classifier")
    state: Literal["queued", "running", "done", "failed"]
    fraction: float | None = Field(None, description="0..1 of its steps done; null before the first")
    eta_seconds: float | None = Field(None, description="estimated seconds left; null while unknown")
    summary: str = Field(description='one line for people, e.g. "spam classifier: training, 43%, about 2 min left"')
    updated_at: float | None = None
    message: str | None = Field(None, description="the job's own last words (with the service details only)")
    log: str | None = Field(None, description="its log file (with the service details only)")
    checkpoint: str | None = None


class JobList(BaseModel):
    jobs: list[Job]
    active: bool = Field(description="whether any job is still queued, running or being loaded")


class DecodingDefaults(BaseModel):
    temperature: float
    top_k: int | None
    top_p: float | None
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float


class ChatModelInfo(BaseModel):
    name: str
    state: Literal["loading", "ready", "missing", "error", "disabled"]
    default: bool = Field(description="What a new conversation gets when it names no model")
    detail: str | None = Field(None, description="Why it is not serving")
    make_with: str | None = Field(None, description="The command that makes a missing checkpoint")
    context_length: int | None = None
    decoding: DecodingDefaults = Field(description="A new conversation's settings with this model: its own "
                                                   "defaults (checkpoint metadata) over the service's")


class ChatModels(BaseModel):
    default: str
    models: list[ChatModelInfo]


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


# --- the Lab ----------------------------------------------------------------------

# Sizes past which a Lab request is refused with 422: they keep one Lab request to well under a
# second on a laptop CPU and its JSON answer to about a megabyte. app.services.lab checks them
# again for callers that do not come through these bodies.
MAX_TEXT_CHARS = 4000  # tokenizer playground, attention and next-token prompts (before tokenizing)
MAX_ATTENTION_TOKENS = 64  # a (heads, T, T) map per request
MAX_PROMPT_TOKENS = 512  # next-token prompts
MAX_WORDS = 40  # embeddings: points in one projection
MAX_WORD_CHARS = 40
MAX_MERGE_CHARS = 64  # BPE merges of one word (each step of each pre-token is returned)
MAX_TOP_K = 50  # next-token choices shown

Prompt = not_blank(MAX_TEXT_CHARS)
Word = not_blank(MAX_WORD_CHARS)


class Token(BaseModel):
    id: int
    text: str = Field(description="The token's bytes read as UTF-8 (U+FFFD where a character is cut)")
    bytes_hex: str = Field(description="The token's bytes in hex")
    special: bool


class TokenizeRequest(RequestModel):
    text: Prompt = Field(examples=["Tokenization isn't magic."])


class Tokenization(BaseModel):
    key: Literal["gpt2", "chat"]
    name: str
    count: int
    tokens: list[Token]


class TokenizeResult(BaseModel):
    characters: int
    bytes: int
    tokenizers: list[Tokenization]
    notes: list[str] = Field(description="Why a tokenizer is missing (the chat model is not loaded)")


class MergesRequest(RequestModel):
    word: Text = Field(min_length=1, max_length=MAX_MERGE_CHARS, examples=[" tokenization"])
    tokenizer: Literal["gpt2", "chat"] = "gpt2"


class MergePart(BaseModel):
    bytes_hex: str
    token: Token | None = Field(description="The token these bytes are, if they are one")


class MergePiece(BaseModel):
    text: str = Field(description="One pre-token: BPE merges never cross the pre-tokenizer's split")
    steps: list[list[MergePart]] = Field(description="The parts before any merge (single bytes), then after each merge")


class MergesResult(BaseModel):
    word: str
    tokenizer: str
    pieces: list[MergePiece]


class AttentionRequest(RequestModel):
    text: Prompt = Field(examples=["The cat sat on the mat because it was tired."])
    layer: bounded(Int, ge=0, le=10_000) = 0
    head: bounded(Int, ge=0, le=10_000) | None = Field(None, description="One head only; by default all heads of the layer")


class AttentionResult(BaseModel):
    model: str
    tokens: list[Token]
    n_layers: int
    n_heads: int
    layer: int
    heads: list[int]
    weights: list[list[list[float]]] = Field(description="Per head in `heads`: rows are queries, columns keys; rows sum to 1")
    average: list[list[float]] = Field(description="The mean over all heads of the layer")


class NextTokenRequest(RequestModel):
    """The prompt is either ``text`` or ``token_ids``, never both."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"oneOf": [{"required": ["text"]}, {"required": ["token_ids"]}]}
    )

    # Not nullable: a prompt is one or the other, and null is neither.
    text: Prompt = Field(None, examples=["The capital of France is"])  # type: ignore[assignment]
    token_ids: list[bounded(Int, ge=0, le=2**31)] = Field(  # type: ignore[assignment]
        None, min_length=1, max_length=MAX_PROMPT_TOKENS,
        description="The prompt as token ids, instead of text (the step button)",
    )
    chat_template: Bool = Field(False, description="Wrap `text` as a new chat's first user message in the model's "
                                "chat template, under the system prompt new chats get (GET /api/v1/settings)")
    temperature: bounded(Float, ge=0.0, le=2.0) = Field(1.0, description="0 shows the model's own distribution")
    top_k: bounded(Int, ge=1, le=1000) | None = None
    # Not just > 0: a top_p that rounds to 0 in float32 would make core's nucleus filter drop every token.
    top_p: bounded(Float, ge=1e-6, le=1.0) | None = None
    k: bounded(Int, ge=1, le=MAX_TOP_K) = Field(10, description="How many of the most likely tokens to return")

    @model_validator(mode="after")
    def _one_prompt(self) -> "NextTokenRequest":
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("send exactly one of text and token_ids")
        return self


class Choice(BaseModel):
    token: Token
    probability: float
    logit: float


class NextTokenResult(BaseModel):
    model: str
    prompt: list[Token]
    text: str = Field(description="The prompt's tokens decoded")
    choices: list[Choice]
    entropy: float = Field(description="Of the sampling distribution, in nats")
    greedy: Token = Field(description="The model's most likely next token (what temperature 0 picks)")


class AnswerToken(BaseModel):
    token: Token
    probability: float | None = Field(description="null where the context window had cut the token's history")


class AnswerTokens(BaseModel):
    model: str
    conversation_id: str
    message_id: str
    prompt_tokens: int
    tokens: list[AnswerToken]
    mean_logprob: float | None
    perplexity: float | None


class EmbeddingsRequest(RequestModel):
    words: list[Word] = Field(min_length=2, max_length=MAX_WORDS, examples=[["king", "queen", "man", "woman", "Paris", "London"]])
    leading_space: Bool = Field(True, description="Encode each word after a space, as it appears in running text")


class EmbeddingPoint(BaseModel):
    word: str
    tokens: list[Token]
    x: float
    y: float


class EmbeddingsResult(BaseModel):
    model: str
    points: list[EmbeddingPoint]
    explained_variance: list[float] = Field(description="Share of the variance along each of the two axes")


class ExplainRequest(RequestModel):
    text: not_blank() = Field(examples=["WINNER! Claim your free prize now"])


class ExplainedToken(BaseModel):
    token: Token
    word: int = Field(description="The word (or, in a long text, the run of words) the token belongs to, from 0")
    push: float = Field(
        description="The word's push towards `target` (spam): the text's log-odds of spam minus those of the text "
        "without the word (occlusion). Positive: towards spam; negative: towards ham; every token of a word carries it"
    )
    attention: float = Field(description="How much the last token attends to this one in the last layer (head mean)")


class Explanation(BaseModel):
    model: str
    label: str = Field(description="The verdict, decided as `/api/v1/classify` decides it (the stored threshold)")
    probabilities: dict[str, float]
    target: str = Field(description="The label a positive push points to: always spam")
    log_odds: float = Field(description="The whole text's log-odds of spam against ham")
    threshold: float | None = Field(
        description="Probability of spam at or above which the verdict is spam; null: the more likely label wins"
    )
    tokens: list[ExplainedToken]
    truncated: bool = Field(description="The text was longer than the classifier reads; only its start is explained")
