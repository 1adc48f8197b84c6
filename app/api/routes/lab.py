"""The Lab: JSON endpoints that look inside the served models, and the pages that draw them.

Every measurement runs on the model the service already holds (see ``app.services.lab``), in a
worker thread. The routes that read a chat model take ``?model=`` (a name of GET /api/v1/models;
by default the default chat model); a stored answer is read by the model of its conversation. Sizes
past the Lab's limits (characters, prompt tokens, layer and head indices, number of words) are
answered 422 with a message that says which limit. Where an external engine serves the chat
(``SCRATCHGPT_CHAT_BACKEND_URL``), the views that read its weights or tokenizer
(:data:`IN_PROCESS_VIEWS`) answer 503 saying so, and the Lab's pages say it before anyone asks.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, Response

from app.api.deps import ConversationDep, LabDep, ModelsDep, OwnerDep, PagesDep, SessionDep, SettingsDep
from app.db import crud
from app.schemas import (
    MODEL_RESPONSES,
    NOT_FOUND,
    AnswerTokens,
    AttentionRequest,
    AttentionResult,
    EmbeddingsRequest,
    EmbeddingsResult,
    ExplainRequest,
    Explanation,
    MergesRequest,
    MergesResult,
    NextTokenRequest,
    NextTokenResult,
    TokenizeRequest,
    TokenizeResult,
)
from app.services import lab
from app.services.registry import CLASSIFIER, ModelRegistry, ModelSlot, ModelUnavailable, UnknownModel
from core.generation.chat_template import ChatTemplateError
from core.tokenizer.errors import TokenizerError
from core.tokenizer.gpt2 import gpt2_tokenizer

router = APIRouter(prefix="/api/v1/lab", tags=["lab"], responses=MODEL_RESPONSES)
pages = APIRouter(include_in_schema=False)

LIMITS = {422: {"description": "Invalid request, or past one of the Lab's size limits (the detail says which)"}}
CHAT_LIMITS = {**LIMITS, 404: {"description": "No chat model of that name is served"}}

ModelName = Annotated[str | None, Query(min_length=1, max_length=200,
                                        description="A chat model of GET /api/v1/models; by default the default one")]


def chat_model(models: ModelRegistry, name: str | None) -> ModelSlot:
    """The chat model ``name`` (None: the default) if it is serving: 404 for a name not served, else 503 if not ready."""
    try:
        return models.require_chat(name)
    except UnknownModel as exc:
        raise HTTPException(404, detail=str(exc)) from None


# The Lab's pages that read the chat model's weights or tokenizer in this process, and what each page
# says where an external engine serves the chat (it gives answers, not attention maps or logits).
_ELSEWHERE = "which are not in this process: an external inference engine serves the chat. This view is unavailable here."
IN_PROCESS_VIEWS = {
    "tokens": "The chat model's own tokenizer is not in this process (an external inference engine serves the "
              "chat): only GPT-2's tokenizer is shown, and merges are GPT-2's.",
    "attention": f"This view reads the chat model's attention weights, {_ELSEWHERE}",
    "next-token": f"This view reads the chat model's next-token probabilities, {_ELSEWHERE}",
    "few-shot": f"This view reads the chat model's label probabilities, {_ELSEWHERE}",
    "embeddings": f"This view reads the chat model's token embeddings, {_ELSEWHERE}",
}
REMOTE_CHAT = ("the chat model runs on an external inference engine (SCRATCHGPT_CHAT_BACKEND_URL), which gives "
               "answers, not its weights: this Lab view needs the model in this process. Unset "
               "SCRATCHGPT_CHAT_BACKEND_URL and point SCRATCHGPT_CHAT_CHECKPOINT at the model to use it")


def in_process_chat(models: ModelRegistry, name: str | None) -> ModelSlot:
    """The chat model ``name`` (None: the default) for a view that reads its weights or tokenizer: as
    :func:`chat_model`, and a 503 that says why where an external engine serves the chat."""
    slot = chat_model(models, name)
    if slot.backend is not None:
        raise ModelUnavailable(slot.role, "remote", REMOTE_CHAT)
    return slot


async def measure(runner: lab.LabRunner, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` on the worker of the model it reads; the Lab's input errors as 422s (every Lab route)."""
    try:
        return await runner.run(fn, *args)
    except (lab.LabInputError, TokenizerError) as exc:
        raise HTTPException(422, detail=str(exc)) from None


@router.post("/tokenize", response_model=TokenizeResult, responses=CHAT_LIMITS)
async def tokenize(body: TokenizeRequest, runner: LabDep, models: ModelsDep, owner: OwnerDep,
                   model: ModelName = None) -> TokenizeResult:
    """The text as tokens of GPT-2's tokenizer and of the chat model's, side by side."""
    tokenizers: dict[str, tuple[str, Any]] = {"gpt2": ("GPT-2 (tiktoken ranks)", gpt2_tokenizer())}
    notes = []
    try:
        slot = in_process_chat(models, model)
        tokenizers["chat"] = (f"{slot.name} (chat model)", slot.checkpoint.tokenizer)
    except ModelUnavailable as exc:
        notes.append(exc.detail)
    return await measure(runner, lab.tokenize, tokenizers, body.text, notes)


@router.post("/merges", response_model=MergesResult, responses=CHAT_LIMITS)
async def merges(body: MergesRequest, runner: LabDep, models: ModelsDep, owner: OwnerDep,
                 model: ModelName = None) -> MergesResult:
    """Byte-pair merges of one word, step by step, by our from-scratch BPE (GPT-2's ranks, or the chat model's)."""
    if body.tokenizer == "gpt2":
        tokenizer, name = gpt2_tokenizer(impl="bpe"), "GPT-2"
    else:
        slot = in_process_chat(models, model)
        tokenizer, name = slot.checkpoint.tokenizer, slot.name
    return await measure(runner, lab.bpe_merges, tokenizer, name, body.word)


@router.post("/attention", response_model=AttentionResult, responses=CHAT_LIMITS)
async def attention(body: AttentionRequest, runner: LabDep, models: ModelsDep, owner: OwnerDep,
                    model: ModelName = None) -> AttentionResult:
    """Attention weights of one layer of the chat model, per head and averaged over heads."""
    slot = in_process_chat(models, model)
    return await measure(runner, lab.attention, slot.checkpoint, body.text, body.layer, body.head)


@router.post("/next-token", response_model=NextTokenResult, responses=CHAT_LIMITS)
async def next_token(body: NextTokenRequest, runner: LabDep, models: ModelsDep, owner: OwnerDep,
                     settings: SettingsDep, model: ModelName = None) -> NextTokenResult:
    """The chat model's most likely next tokens under a temperature and top-k/top-p, with the entropy.
    With ``chat_template``, the text is a new chat's first message, under the system prompt new chats get."""
    slot = in_process_chat(models, model)
    try:
        return await measure(runner, lab.next_token_choices, slot.checkpoint, body, settings.default_system_prompt)
    except ChatTemplateError as exc:
        raise HTTPException(422, detail=str(exc)) from None


@router.get(
    "/conversations/{conversation_id}/messages/{message_id}/tokens",
    response_model=AnswerTokens,
    responses={**NOT_FOUND, 422: {"description": "The message is not an assistant message"}},
)
async def answer_tokens(
    conversation: ConversationDep,
    message_id: Annotated[str, Path(min_length=1, max_length=64)],
    session: SessionDep,
    runner: LabDep,
    models: ModelsDep,
) -> AnswerTokens:
    """How likely the conversation's chat model found each token of one of this owner's stored answers."""
    slot = in_process_chat(models, conversation.model or None)
    messages = crud.list_messages(session, conversation.id)
    index = next((i for i, m in enumerate(messages) if m.public_id == message_id), None)
    if index is None:
        raise HTTPException(404, detail="message not found in this conversation")
    message = messages[index]
    if message.role != "assistant":
        raise HTTPException(422, detail=f"message {message_id} is a {message.role} message; pick an assistant answer")
    return await measure(runner, lab.answer_tokens, slot.checkpoint, conversation, messages[:index], message)


@router.post("/embeddings", response_model=EmbeddingsResult, responses=CHAT_LIMITS)
async def embeddings(body: EmbeddingsRequest, runner: LabDep, models: ModelsDep, owner: OwnerDep,
                     model: ModelName = None) -> EmbeddingsResult:
    """A 2-D PCA projection of the chat model's token embeddings of the given words."""
    slot = in_process_chat(models, model)
    return await measure(runner, lab.embedding_projection, slot.checkpoint, body.words, body.leading_space)


@router.post("/explain", response_model=Explanation, responses=LIMITS)
async def explain(body: ExplainRequest, runner: LabDep, models: ModelsDep, settings: SettingsDep,
                  owner: OwnerDep) -> Explanation:
    """Which words moved the spam classifier's verdict (occlusion on the spam log-odds: + towards spam, - towards ham),
    and last-token attention; the verdict is decided as /api/v1/classify decides it."""
    slot = models.require(CLASSIFIER)
    return await measure(runner, lab.explain_classification, slot.checkpoint, body.text, settings.max_classify_chars)


# --- pages -------------------------------------------------------------------------------

LAB_PAGES = {
    "tokens": "lab/tokens.html",
    "attention": "lab/attention.html",
    "next-token": "lab/next_token.html",
    "embeddings": "lab/embeddings.html",
    "levels": "lab/levels.html",
    "few-shot": "lab/few_shot.html",
}


def _remote_views(models: ModelRegistry) -> dict[str, str]:
    """What each Lab page lacks, where an external engine serves the chat; nothing otherwise."""
    return IN_PROCESS_VIEWS if models.default_chat().backend is not None else {}


@pages.get("/lab", response_class=HTMLResponse)
def lab_index(request: Request, ui: PagesDep, models: ModelsDep) -> Response:
    return ui.render(request, "lab/index.html", page="lab", lab_page="index", remote_views=_remote_views(models))


@pages.get("/lab/{name}", response_class=HTMLResponse)
def lab_page(request: Request, ui: PagesDep, models: ModelsDep, name: str) -> Response:
    template = LAB_PAGES.get(name)
    if template is None:
        raise HTTPException(404, detail=f"no Lab page {name!r}; try /lab")
    return ui.render(request, template, page="lab", lab_page=name, remote_views=_remote_views(models))

