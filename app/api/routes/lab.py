"""The Lab: JSON endpoints that look inside the served models, and the pages that draw them.

Every measurement runs on the model the service already holds (see ``app.lab``), in a worker
thread. Sizes past the Lab's limits (characters, prompt tokens, layer and head indices,
number of words) are answered 422 with a message that says which limit.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import HTMLResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from app import lab
from app.api.deps import ConversationDep, ModelsDep, OwnerDep, SessionDep, SettingsDep
from app.api.routes.pages import _page
from app.db import crud
from app.db.models import STATUS_ERROR
from app.registry import CHAT, CLASSIFIER, ModelUnavailable
from app.schemas import MODEL_RESPONSES, NOT_FOUND, Bool, Float, Int, RequestModel, Text
from core.generation.chat_template import ChatTemplateError
from core.generation.sampling import SamplingConfig
from core.tokenizer.errors import TokenizerError

router = APIRouter(prefix="/api/v1/lab", tags=["lab"], responses=MODEL_RESPONSES)
pages = APIRouter(include_in_schema=False)

LIMITS = {422: {"description": "Invalid request, or past one of the Lab's size limits (the detail says which)"}}



def bounded(strict: Any, **limits: Any) -> Any:
    """``Int`` or ``Float`` from app.schemas with limits, written as ``minimum``/``maximum`` in OpenAPI.

    The limits must come before the strict-type validator: placed after it (``Annotated[Int,
    Field(ge=...)]``), pydantic still enforces them but writes non-standard ``ge``/``le`` keys into
    the schema, which clients and fuzzers do not read.
    """
    return Annotated[(strict.__origin__, Field(**limits), *strict.__metadata__)]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty or only whitespace; type some text")
    return value


def not_blank(max_length: int | None = None) -> Any:
    """``Text`` with a non-space character: the schema says so with a pattern (unanchored in JSON
    Schema, so it means "contains one"), the validator in words. Limits go first, as in ``bounded``."""
    limits = Field(min_length=1, max_length=max_length, json_schema_extra={"pattern": r"\S"})
    return Annotated[(str, limits, *Text.__metadata__, AfterValidator(_not_blank))]


Prompt = not_blank(lab.MAX_TEXT_CHARS)
Word = not_blank(lab.MAX_WORD_CHARS)


# --- bodies ------------------------------------------------------------------------------


class Token(BaseModel):
    id: int
    text: str = Field(description="The token's bytes read as UTF-8 (U+FFFD where a character is cut)")
    bytes_hex: str = Field(description="The token's bytes in hex")
    special: bool


def _token(view: lab.TokenView) -> Token:
    return Token(id=view.id, text=view.text, bytes_hex=view.bytes_hex, special=view.special)


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
    word: Text = Field(min_length=1, max_length=lab.MAX_MERGE_CHARS, examples=[" tokenization"])
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
        None, min_length=1, max_length=lab.MAX_PROMPT_TOKENS,
        description="The prompt as token ids, instead of text (the step button)",
    )
    chat_template: Bool = Field(False, description="Wrap `text` as a user message in the model's chat template")
    temperature: bounded(Float, ge=0.0, le=2.0) = Field(1.0, description="0 shows the model's own distribution")
    top_k: bounded(Int, ge=1, le=1000) | None = None
    # Not just > 0: a top_p that rounds to 0 in float32 would make core's nucleus filter drop every token.
    top_p: bounded(Float, ge=1e-6, le=1.0) | None = None
    k: bounded(Int, ge=1, le=lab.MAX_TOP_K) = Field(10, description="How many of the most likely tokens to return")

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
    message_id: int
    prompt_tokens: int
    tokens: list[AnswerToken]
    mean_logprob: float | None
    perplexity: float | None


class EmbeddingsRequest(RequestModel):
    words: list[Word] = Field(min_length=2, max_length=lab.MAX_WORDS, examples=[["king", "queen", "man", "woman", "Paris", "London"]])
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
    gradient_x_input: float = Field(description="Positive pushes towards `target`, negative away from it")
    attention: float = Field(description="How much the last token attends to this one in the last layer (head mean)")


class Explanation(BaseModel):
    model: str
    label: str
    probabilities: dict[str, float]
    target: str
    tokens: list[ExplainedToken]
    truncated: bool = Field(description="The text was longer than the classifier reads; only its start is explained")


# --- helpers -----------------------------------------------------------------------------


async def _measure(request: Request, fn: Any, *args: Any) -> Any:
    try:
        return await lab.lab_runner(request.app.state).run(fn, *args)
    except (lab.LabInputError, TokenizerError) as exc:
        raise HTTPException(422, detail=str(exc)) from None


# --- endpoints ---------------------------------------------------------------------------


@router.post("/tokenize", response_model=TokenizeResult, responses=LIMITS)
async def tokenize(body: TokenizeRequest, request: Request, models: ModelsDep, owner: OwnerDep) -> TokenizeResult:
    """The text as tokens of GPT-2's tokenizer and of the chat model's, side by side."""
    from core.tokenizer.gpt2 import gpt2_tokenizer

    tokenizers: dict[str, tuple[str, Any]] = {"gpt2": ("GPT-2 (tiktoken ranks)", gpt2_tokenizer())}
    notes = []
    try:
        slot = models.require(CHAT)
        tokenizers["chat"] = (f"{slot.name} (chat model)", slot.checkpoint.tokenizer)
    except ModelUnavailable as exc:
        notes.append(exc.detail)
    results = await _measure(request, lab.tokenize, tokenizers, body.text)
    text = lab.clean_text(body.text)
    return TokenizeResult(
        characters=len(text),
        bytes=len(text.encode("utf-8")),
        tokenizers=[Tokenization(key=r.key, name=r.name, count=len(r.tokens), tokens=[_token(t) for t in r.tokens])
                    for r in results],
        notes=notes,
    )


@router.post("/merges", response_model=MergesResult, responses=LIMITS)
async def merges(body: MergesRequest, request: Request, models: ModelsDep, owner: OwnerDep) -> MergesResult:
    """Byte-pair merges of one word, step by step, by our from-scratch BPE (GPT-2's ranks, or the chat model's)."""
    if body.tokenizer == "gpt2":
        from core.tokenizer.gpt2 import gpt2_tokenizer

        tokenizer, name = gpt2_tokenizer(impl="bpe"), "GPT-2"
    else:
        slot = models.require(CHAT)
        tokenizer, name = slot.checkpoint.tokenizer, slot.name
    pieces = await _measure(request, lab.bpe_merges, tokenizer, body.word)
    return MergesResult(
        word=lab.clean_text(body.word),
        tokenizer=name,
        pieces=[
            MergePiece(
                text=piece.text,
                steps=[[MergePart(bytes_hex=raw.hex(), token=_token(view) if view else None) for raw, view in step]
                       for step in piece.steps],
            )
            for piece in pieces
        ],
    )


@router.post("/attention", response_model=AttentionResult, responses=LIMITS)
async def attention(body: AttentionRequest, request: Request, models: ModelsDep, owner: OwnerDep) -> AttentionResult:
    """Attention weights of one layer of the chat model, per head and averaged over heads."""
    slot = models.require(CHAT)
    r = await _measure(request, lab.attention, slot.checkpoint, body.text, body.layer, body.head)
    return AttentionResult(
        model=slot.name, tokens=[_token(t) for t in r.tokens], n_layers=r.n_layers, n_heads=r.n_heads,
        layer=r.layer, heads=r.heads, weights=r.weights, average=r.average,
    )


def _next_token(checkpoint: Any, body: NextTokenRequest) -> lab.NextTokenResult:
    ids = lab.prompt_ids(checkpoint, body.text, body.token_ids, body.chat_template)
    sampling = SamplingConfig(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
    return lab.next_token_distribution(checkpoint, ids, sampling, body.k)


@router.post("/next-token", response_model=NextTokenResult, responses=LIMITS)
async def next_token(body: NextTokenRequest, request: Request, models: ModelsDep, owner: OwnerDep) -> NextTokenResult:
    """The chat model's most likely next tokens under a temperature and top-k/top-p, with the entropy."""
    slot = models.require(CHAT)
    try:
        r = await _measure(request, _next_token, slot.checkpoint, body)
    except ChatTemplateError as exc:
        raise HTTPException(422, detail=str(exc)) from None
    return NextTokenResult(
        model=slot.name,
        prompt=[_token(t) for t in r.prompt],
        text=r.text,
        choices=[Choice(token=_token(t), probability=round(p, lab.DECIMALS), logit=round(logit, 4))
                 for t, p, logit in r.choices],
        entropy=round(r.entropy, lab.DECIMALS),
        greedy=_token(r.greedy),
    )


@router.get(
    "/conversations/{conversation_id}/messages/{message_id}/tokens",
    response_model=AnswerTokens,
    responses={**NOT_FOUND, 422: {"description": "The message is not an assistant message"}},
)
async def answer_tokens(
    conversation: ConversationDep,
    message_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
    session: SessionDep,
    request: Request,
    models: ModelsDep,
) -> AnswerTokens:
    """How likely the chat model found each token of one of this owner's stored answers."""
    slot = models.require(CHAT)
    messages = crud.list_messages(session, conversation.id)
    index = next((i for i, m in enumerate(messages) if m.id == message_id), None)
    if index is None:
        raise HTTPException(404, detail="message not found in this conversation")
    message = messages[index]
    if message.role != "assistant":
        raise HTTPException(422, detail=f"message {message_id} is a {message.role} message; pick an assistant answer")
    # The prompt the answer was generated from: the same turns, minus the ones dropped to fit then,
    # under the conversation's system prompt as it is now (an edited one changes the measurement).
    turns = [
        {"role": m.role, "content": m.content}
        for m in messages[:index]
        if m.role == "user" or (m.role == "assistant" and m.status != STATUS_ERROR and m.content)
    ][message.dropped_messages or 0 :]
    system = [{"role": "system", "content": conversation.system_prompt}] if conversation.system_prompt else []

    def measure() -> lab.AnswerProbabilities:
        from app.chat import encode_prompt

        return lab.answer_probabilities(slot.checkpoint, encode_prompt(slot.checkpoint, system + turns), message.content)

    r = await _measure(request, measure)
    return AnswerTokens(
        model=slot.name,
        conversation_id=conversation.id,
        message_id=message.id,
        prompt_tokens=r.prompt_tokens,
        tokens=[AnswerToken(token=_token(t), probability=p) for t, p in r.tokens],
        mean_logprob=None if r.mean_logprob is None else round(r.mean_logprob, lab.DECIMALS),
        perplexity=None if r.mean_logprob is None else round(math.exp(min(-r.mean_logprob, 700.0)), 4),
    )


@router.post("/embeddings", response_model=EmbeddingsResult, responses=LIMITS)
async def embeddings(body: EmbeddingsRequest, request: Request, models: ModelsDep, owner: OwnerDep) -> EmbeddingsResult:
    """A 2-D PCA projection of the chat model's token embeddings of the given words."""
    slot = models.require(CHAT)
    points, ratios = await _measure(request, lab.embedding_projection, slot.checkpoint, body.words, body.leading_space)
    return EmbeddingsResult(
        model=slot.name,
        points=[EmbeddingPoint(word=p.word, tokens=[_token(t) for t in p.tokens], x=p.x, y=p.y) for p in points],
        explained_variance=ratios,
    )


@router.post("/explain", response_model=Explanation, responses=LIMITS)
async def explain(body: ExplainRequest, request: Request, models: ModelsDep, settings: SettingsDep,
                  owner: OwnerDep) -> Explanation:
    """Which tokens moved the spam classifier's decision: gradient x input, and last-token attention."""
    slot = models.require(CLASSIFIER)
    r = await _measure(request, lab.explain_classification, slot.checkpoint, body.text, settings.max_classify_chars)
    return Explanation(
        model=slot.name,
        label=r.label,
        probabilities={k: round(v, lab.DECIMALS) for k, v in r.probabilities.items()},
        target=r.target,
        tokens=[ExplainedToken(token=_token(t), gradient_x_input=g, attention=a)
                for t, g, a in zip(r.tokens, r.gradient_x_input, r.last_token_attention)],
        truncated=r.truncated,
    )


# --- pages -------------------------------------------------------------------------------

LAB_PAGES = {
    "tokens": "lab/tokens.html",
    "attention": "lab/attention.html",
    "next-token": "lab/next_token.html",
    "embeddings": "lab/embeddings.html",
    "levels": "lab/levels.html",
    "few-shot": "lab/few_shot.html",
}


@pages.get("/lab", response_class=HTMLResponse)
def lab_index(request: Request) -> HTMLResponse:
    return _page(request, "lab/index.html", page="lab", lab_page="index")


@pages.get("/lab/{name}", response_class=HTMLResponse)
def lab_page(request: Request, name: str) -> HTMLResponse:
    template = LAB_PAGES.get(name)
    if template is None:
        raise HTTPException(404, detail=f"no Lab page {name!r}; try /lab")
    return _page(request, template, page="lab", lab_page=name)
