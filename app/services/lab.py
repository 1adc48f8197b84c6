"""The Lab's service glue: measurements of the served models, run off the event loop.

Every measurement reads the very checkpoint a model worker serves (``slot.checkpoint``
in the registry), so the Lab never loads a second copy of a model. The model-side work
lives in ``core.introspection`` (attention through the explicit attention path, next-token
distributions, teacher-forced token probabilities, PCA, occlusion); this module turns
requests into calls of it and results into the API's own bodies (``app.schemas``), the one
layer of Lab result types.

The functions here are blocking. :class:`LabRunner` runs a measurement of a served model on
that model's worker (``worker.call``), in turn with its chat answers or classification
batches, so a Lab request never runs a forward pass on the event loop and never computes on
a model at the same time as the model's own worker. Work that reads no model (tokenizing)
runs in a thread, one at a time per app.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import torch

from app.db.models import Conversation, Message
from app.schemas import (
    MAX_ATTENTION_TOKENS,
    MAX_MERGE_CHARS,
    MAX_PROMPT_TOKENS,
    MAX_TEXT_CHARS,
    MAX_WORD_CHARS,
    MAX_WORDS,
    AnswerToken,
    AnswerTokens,
    AttentionResult,
    Choice,
    EmbeddingPoint,
    EmbeddingsResult,
    ExplainedToken,
    Explanation,
    MergePart,
    MergePiece,
    MergesResult,
    NextTokenRequest,
    NextTokenResult,
    Token,
    Tokenization,
    TokenizeResult,
)
from app.services.prompts import conversation_turns, encode_prompt, neutralize_specials, with_system
from core.classifier import class_logits, decide, decision_threshold
from core.generation.sampling import SamplingConfig
from core.introspection import (
    attention_maps,
    embedding_vectors,
    last_token_attention,
    next_token,
    occlusion,
    pca_2d,
    token_probabilities,
    word_index,
)
from core.tokenizer.errors import TokenizerError
from core.tokenizer.specials import repair_surrogates

from app.schemas import is_blank, strip_blank

T = TypeVar("T")

DECIMALS = 5  # probabilities and weights are rounded to this many places in answers


class LabInputError(ValueError):
    """A Lab request past a size limit or naming something the model does not have; answered 422."""


def token(tokenizer: Any, token_id: int) -> Token:
    """One token as the pages draw it: its id, its bytes (hex) and those bytes read as UTF-8."""
    specials = set((getattr(tokenizer, "special_tokens", None) or {}).values())
    try:
        raw = tokenizer.token_bytes(token_id)
    except TokenizerError:
        # A model's vocabulary can be padded past its tokenizer's: those rows are never real text.
        return Token(id=token_id, text=f"<unused {token_id}>", bytes_hex="", special=False)
    # Invalid or partial UTF-8 shows as U+FFFD.
    return Token(id=token_id, text=raw.decode("utf-8", errors="replace"), bytes_hex=raw.hex(),
                 special=token_id in specials)


def tokens(tokenizer: Any, ids: Sequence[int]) -> list[Token]:
    return [token(tokenizer, i) for i in ids]


def clean_text(text: str) -> str:
    """User text safe to echo in JSON: lone surrogates (valid JSON, not valid UTF-8) become U+FFFD."""
    return repair_surrogates(text)


def _round(x: float) -> float | None:
    return None if math.isnan(x) else round(x, DECIMALS)


def _rounded(t: torch.Tensor) -> Any:
    return (t.float() * 10**DECIMALS).round().div(10**DECIMALS).tolist()


def _check_chars(text: str, what: str = "text", limit: int = MAX_TEXT_CHARS) -> None:
    if is_blank(text):
        raise LabInputError(f"{what} is empty; type some text")
    if len(text) > limit:
        raise LabInputError(f"{what} has {len(text)} characters; the Lab's limit is {limit}")


def _check_tokens(ids: Sequence[int], limit: int, what: str) -> None:
    if not ids:
        raise LabInputError(f"{what} has no tokens; type some text")
    if len(ids) > limit:
        raise LabInputError(f"{what} is {len(ids)} tokens long; the limit here is {limit} tokens, shorten it")


# --- tokenizers ----------------------------------------------------------------------


def tokenize(tokenizers: Mapping[str, tuple[str, Any]], text: str, notes: list[str]) -> TokenizeResult:
    """``text`` split by each tokenizer (key -> (display name, tokenizer)); special-token strings count as specials.

    ``notes`` say why a tokenizer is missing (the chat model is not loaded).
    """
    _check_chars(text)
    results = []
    for key, (name, tokenizer) in tokenizers.items():
        ids = tokenizer.encode(text, allowed_special="all")
        results.append(Tokenization(key=key, name=name, count=len(ids), tokens=tokens(tokenizer, ids)))
    echoed = clean_text(text)
    return TokenizeResult(characters=len(echoed), bytes=len(echoed.encode("utf-8")), tokenizers=results, notes=notes)


def bpe_merges(tokenizer: Any, name: str, word: str) -> MergesResult:
    """The merges BPE applies to each pre-token of ``word``, step by step (merges never cross pre-tokens).

    Each step lists the parts of the pre-token: a token, or bytes that are not one (yet).
    """
    word = clean_text(word)
    if not word:
        raise LabInputError("word is empty; type one word")
    if len(word) > MAX_MERGE_CHARS:
        raise LabInputError(f"word has {len(word)} characters; the limit is {MAX_MERGE_CHARS}")
    ranks = getattr(tokenizer, "ranks", {})
    pieces = []
    for piece in tokenizer.pretokenize(word):
        steps = [
            [MergePart(bytes_hex=part.hex(), token=token(tokenizer, ranks[part]) if part in ranks else None)
             for part in step]
            for step in tokenizer.merge_steps(piece)
        ]
        pieces.append(MergePiece(text=piece, steps=steps))
    return MergesResult(word=word, tokenizer=name, pieces=pieces)


# --- attention ------------------------------------------------------------------------


def attention(checkpoint: Any, text: str, layer: int, head: int | None) -> AttentionResult:
    """Attention weights of one layer (all heads, or one) for ``text``, from the explicit attention path."""
    _check_chars(text)
    cfg = checkpoint.config
    if not 0 <= layer < cfg.n_layers:
        raise LabInputError(f"layer {layer} does not exist: the model has {cfg.n_layers} layers (0 to {cfg.n_layers - 1})")
    if head is not None and not 0 <= head < cfg.n_heads:
        raise LabInputError(f"head {head} does not exist: each layer has {cfg.n_heads} heads (0 to {cfg.n_heads - 1})")
    tokenizer = checkpoint.tokenizer
    ids = tokenizer.encode(text, allowed_special="all")
    _check_tokens(ids, min(MAX_ATTENTION_TOKENS, cfg.context_length), "the prompt")
    maps = attention_maps(checkpoint.model, ids)[layer]  # (heads, T, T)
    heads = list(range(cfg.n_heads)) if head is None else [head]
    return AttentionResult(
        model=checkpoint.name,
        tokens=tokens(tokenizer, ids),
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        layer=layer,
        heads=heads,
        weights=[_rounded(maps[h]) for h in heads],
        average=_rounded(maps.mean(0)),
    )


# --- next token ------------------------------------------------------------------------


def check_token_ids(tokenizer: Any, ids: Sequence[int], model_vocab: int) -> None:
    for i in ids:
        if not 0 <= i < model_vocab:
            raise LabInputError(f"token id {i} is outside the model's vocabulary (0 to {model_vocab - 1})")
        try:
            tokenizer.token_bytes(i)
        except TokenizerError:
            raise LabInputError(f"token id {i} is not a token of this model's tokenizer") from None


def prompt_ids(checkpoint: Any, text: str | None, token_ids: list[int] | None, chat_template: bool,
               system_prompt: str = "") -> list[int]:
    """The prompt as token ids: ``token_ids`` as given, or ``text`` encoded (when ``chat_template``,
    as the first user turn of a new chat: under ``system_prompt``, the one new chats get)."""
    tokenizer = checkpoint.tokenizer
    if token_ids is not None:
        check_token_ids(tokenizer, token_ids, checkpoint.config.vocab_size)
        ids = list(token_ids)
    else:
        assert text is not None
        _check_chars(text)
        if chat_template:
            ids = encode_prompt(checkpoint, with_system(system_prompt, [{"role": "user", "content": text}]))
        else:
            ids = tokenizer.encode(text, allowed_special="all")
    _check_tokens(ids, min(MAX_PROMPT_TOKENS, checkpoint.config.context_length), "the prompt")
    return ids


def next_token_choices(checkpoint: Any, request: NextTokenRequest, system_prompt: str = "") -> NextTokenResult:
    """The k most likely next tokens under the request's sampling settings, the entropy and the greedy
    choice; a chat-template prompt is a new chat's first message, under ``system_prompt``."""
    ids = prompt_ids(checkpoint, request.text, request.token_ids, request.chat_template, system_prompt)
    sampling = SamplingConfig(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p)
    tokenizer = checkpoint.tokenizer
    result = next_token(checkpoint.model, ids, sampling, k=request.k)
    return NextTokenResult(
        model=checkpoint.name,
        prompt=tokens(tokenizer, ids),
        text=tokenizer.decode(ids),
        choices=[
            Choice(token=token(tokenizer, c.token_id), probability=round(c.probability, DECIMALS), logit=round(c.logit, 4))
            for c in result.choices
        ],
        entropy=round(result.entropy, DECIMALS),
        greedy=token(tokenizer, result.greedy_id),
    )


# --- a stored answer, token by token ---------------------------------------------------


def answer_tokens(checkpoint: Any, conversation: Conversation, earlier: list[Message], answer: Message) -> AnswerTokens:
    """How likely the model found each token of a stored ``answer`` after the messages ``earlier`` than it
    (teacher forcing, one pass).

    The prompt is the one the answer was generated from: the same turns, minus the ones dropped to
    fit then, under the conversation's system prompt as it is now (an edited one changes the
    measurement). The answer's ids are its text encoded again: the ids that were sampled are not
    stored, and re-encoding can split a few spots differently than sampling did.
    """
    turns = conversation_turns(earlier)[answer.dropped_messages or 0 :]
    prompt = encode_prompt(checkpoint, with_system(conversation.system_prompt, turns))
    tokenizer = checkpoint.tokenizer
    ids = tokenizer.encode(answer.content, allowed_special="all")
    probs = token_probabilities(checkpoint.model, prompt, ids)
    known = [p for p in probs if not math.isnan(p) and p > 0]
    mean = sum(math.log(p) for p in known) / len(known) if known else None
    return AnswerTokens(
        model=checkpoint.name,
        conversation_id=conversation.id,
        message_id=answer.public_id,
        prompt_tokens=len(prompt),
        tokens=[AnswerToken(token=token(tokenizer, i), probability=_round(p)) for i, p in zip(ids, probs)],
        mean_logprob=None if mean is None else round(mean, DECIMALS),
        perplexity=None if mean is None else round(math.exp(min(-mean, 700.0)), 4),
    )


# --- embeddings ------------------------------------------------------------------------


def embedding_projection(checkpoint: Any, words: list[str], leading_space: bool) -> EmbeddingsResult:
    """2-D PCA of the words' input embeddings (each word: the mean of its tokens' rows)."""
    if len(words) < 2:
        raise LabInputError(f"{len(words)} word given; a projection needs at least 2 words")
    if len(words) > MAX_WORDS:
        raise LabInputError(f"{len(words)} words given; the limit is {MAX_WORDS}")
    cleaned = []
    for i, word in enumerate(words):
        word = strip_blank(clean_text(word))
        if not word:
            raise LabInputError(f"words[{i}] is empty")
        if len(word) > MAX_WORD_CHARS:
            raise LabInputError(f"words[{i}] has {len(word)} characters; the limit is {MAX_WORD_CHARS}")
        cleaned.append(word)
    tokenizer = checkpoint.tokenizer
    # In running text a word usually follows a space, and byte-level BPE tokenizers
    # have a separate (and better trained) token for " word" than for "word".
    groups = [tokenizer.encode((" " if leading_space else "") + w, allowed_special="all") for w in cleaned]
    for i, (word, group) in enumerate(zip(cleaned, groups)):
        if not group:
            # A vocabulary may lack some bytes (SmolLM2's lacks most control characters), and a
            # tokenizer drops what it cannot encode, as Hugging Face's does: no tokens, no point.
            raise LabInputError(f"words[{i}] ({word!r}) has no tokens: this model's vocabulary lacks its "
                                "characters; use another word")
    vectors = embedding_vectors(_language_model(checkpoint), groups)
    coords, ratios = pca_2d(vectors)
    points = [
        EmbeddingPoint(word=w, tokens=tokens(tokenizer, g), x=round(float(x), DECIMALS), y=round(float(y), DECIMALS))
        for w, g, (x, y) in zip(cleaned, groups, coords.tolist())
    ]
    return EmbeddingsResult(
        model=checkpoint.name, points=points, explained_variance=[round(float(r), DECIMALS) for r in ratios]
    )


def _language_model(checkpoint: Any) -> Any:
    return getattr(checkpoint.model, "backbone", checkpoint.model)


# --- classifier explanation -------------------------------------------------------------


# Occlusion runs the classifier once per word on the text without it, so its cost grows with
# words x tokens. An SMS (under 50 tokens) gets every word measured alone; a longer text is
# measured in runs of adjacent words, about OCCLUSION_TOKENS tokens in all (48 CPU-seconds for
# 240 tokens word by word on one thread of the project machine; this caps it near a third).
OCCLUSION_TOKENS = 4096
MAX_RUNS, MIN_RUNS = 48, 8


def explain_classification(checkpoint: Any, text: str, max_chars: int) -> Explanation:
    """Which words moved the classifier: each word's occlusion push on the spam log-odds, and
    last-token attention.

    The text is neutralized, encoded and cut exactly as the classify endpoint does it, and the
    label follows the checkpoint's stored threshold, so the explanation is of the very verdict
    the classify endpoint reports. A push is positive towards spam and negative towards ham,
    whatever the verdict (``core.introspection.occlusion``).
    """
    _check_chars(text, limit=max_chars)
    tokenizer = checkpoint.tokenizer
    labels = list(checkpoint.labels or [])
    if "spam" not in labels or len(labels) != 2:
        raise LabInputError(f"the classifier's labels are {labels}; an explanation needs two labels, one of them 'spam'")
    text = neutralize_specials(text, getattr(tokenizer, "special_tokens", None))
    max_length = int(checkpoint.metadata.get("max_length") or checkpoint.config.context_length)
    all_ids = tokenizer.encode_ordinary(text)  # as core.classifier.encode_texts reads it
    ids = all_ids[:max_length]
    _check_tokens(ids, max_length, "the text")
    classifier = checkpoint.model
    spam, ham = labels.index("spam"), 1 - labels.index("spam")
    words = word_index([tokenizer.token_bytes(i) for i in ids])
    max_runs = max(MIN_RUNS, min(MAX_RUNS, OCCLUSION_TOKENS // len(ids) - 1))
    per_run = math.ceil((words[-1] + 1) / max_runs)
    runs = [w // per_run for w in words]
    measured = occlusion(classifier, ids, runs, positive=spam, negative=ham, pad_id=tokenizer.eos_id)
    probs = class_logits(classifier, [ids], tokenizer.eos_id).softmax(-1)[0].tolist()
    threshold = decision_threshold(checkpoint)
    attentions = last_token_attention(classifier, ids)
    return Explanation(
        model=checkpoint.name,
        label=labels[decide(probs, threshold)],  # as core.classifier.classify decides
        probabilities={label: round(p, DECIMALS) for label, p in zip(labels, probs)},
        target="spam",
        log_odds=round(measured.log_odds, DECIMALS),
        threshold=threshold,
        tokens=[
            ExplainedToken(token=t, word=r, push=round(measured.push[r], DECIMALS), attention=round(a, DECIMALS))
            for t, r, a in zip(tokens(tokenizer, ids), runs, attentions)
        ],
        truncated=len(all_ids) > len(ids),
    )


# --- running off the event loop --------------------------------------------------------


class LabRunner:
    """Runs blocking Lab measurements off the event loop: on the worker of the model they read
    (a served checkpoint among their arguments), else in a thread, one at a time."""

    def __init__(self, models: Callable[[], Any] | None = None) -> None:
        # The app's registry, looked up per call: a restarted app replaces it.
        self._models = models or (lambda: None)
        self._limiter: anyio.CapacityLimiter | None = None

    def worker_for(self, args: Sequence[Any]) -> Any:
        """The worker serving a checkpoint passed in ``args``, or None."""
        for slot in getattr(self._models(), "slots", {}).values():
            if slot.worker is not None and any(arg is slot.checkpoint for arg in args):
                return slot.worker
        return None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        worker = self.worker_for(args)
        if worker is not None:
            return await worker.call(fn, *args)
        if self._limiter is None:  # created on first use, inside the app's event loop
            self._limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
