"""The Lab's service glue: measurements of the served models, run off the event loop.

Every measurement reads the very checkpoint a model worker serves (``slot.checkpoint``
in the registry), so the Lab never loads a second copy of a model. The model-side work
lives in ``core.introspection`` (attention through the explicit attention path, next-token
distributions, teacher-forced token probabilities, PCA, gradient x input); this module turns
requests into calls of it and results into plain, JSON-ready values.

The functions here are blocking. :class:`LabRunner` runs a measurement of a served model on
that model's worker (``worker.call``), in turn with its chat answers or classification
batches, so a Lab request never runs a forward pass on the event loop and never computes on
a model at the same time as the model's own worker. Work that reads no model (tokenizing)
runs in a thread, one at a time per app.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import torch

from core.introspection import (
    attention_maps,
    embedding_vectors,
    input_x_gradient,
    last_token_attention,
    next_token,
    pca_2d,
    token_probabilities,
)
from core.generation.sampling import SamplingConfig
from core.tokenizer.errors import TokenizerError
from core.tokenizer.specials import repair_surrogates

from app.schemas import is_blank, strip_blank

T = TypeVar("T")

# Sizes past which a request is refused with 422: they keep one Lab request to well under a
# second on a laptop CPU and its JSON answer to about a megabyte.
MAX_TEXT_CHARS = 4000  # tokenizer playground, attention and next-token prompts (before tokenizing)
MAX_ATTENTION_TOKENS = 64  # a (heads, T, T) map per request
MAX_PROMPT_TOKENS = 512  # next-token prompts
MAX_WORDS = 40  # embeddings: points in one projection
MAX_WORD_CHARS = 40
MAX_MERGE_CHARS = 64  # BPE merges of one word (each step of each pre-token is returned)
MAX_TOP_K = 50  # next-token choices shown
DECIMALS = 5  # probabilities and weights are rounded to this many places in answers


class LabInputError(ValueError):
    """A Lab request past a size limit or naming something the model does not have; answered 422."""


@dataclass(frozen=True)
class TokenView:
    """One token as the pages draw it: its id, its bytes (hex) and those bytes read as UTF-8."""

    id: int
    text: str  # invalid or partial UTF-8 shows as U+FFFD
    bytes_hex: str
    special: bool


def token_view(tokenizer: Any, token_id: int) -> TokenView:
    specials = set((getattr(tokenizer, "special_tokens", None) or {}).values())
    try:
        raw = tokenizer.token_bytes(token_id)
    except TokenizerError:
        # A model's vocabulary can be padded past its tokenizer's: those rows are never real text.
        return TokenView(token_id, f"<unused {token_id}>", "", False)
    return TokenView(token_id, raw.decode("utf-8", errors="replace"), raw.hex(), token_id in specials)


def token_views(tokenizer: Any, ids: Sequence[int]) -> list[TokenView]:
    return [token_view(tokenizer, i) for i in ids]


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


@dataclass
class Tokenization:
    key: str
    name: str
    tokens: list[TokenView]


def tokenize(tokenizers: Mapping[str, tuple[str, Any]], text: str) -> list[Tokenization]:
    """``text`` split by each tokenizer (key -> (display name, tokenizer)); special-token strings count as specials."""
    _check_chars(text)
    return [
        Tokenization(key, name, token_views(tok, tok.encode(text, allowed_special="all")))
        for key, (name, tok) in tokenizers.items()
    ]


@dataclass
class MergePiece:
    text: str  # one pre-token of the word
    steps: list[list[tuple[bytes, TokenView | None]]]  # parts per step; each part is a token, or bytes that are not


def bpe_merges(tokenizer: Any, word: str) -> list[MergePiece]:
    """The merges BPE applies to each pre-token of ``word``, step by step (merges never cross pre-tokens)."""
    word = clean_text(word)
    if not word:
        raise LabInputError("word is empty; type one word")
    if len(word) > MAX_MERGE_CHARS:
        raise LabInputError(f"word has {len(word)} characters; the limit is {MAX_MERGE_CHARS}")
    ranks = getattr(tokenizer, "ranks", {})
    pieces = []
    for piece in tokenizer.pretokenize(word):
        steps = [
            [(part, token_view(tokenizer, ranks[part]) if part in ranks else None) for part in step]
            for step in tokenizer.merge_steps(piece)
        ]
        pieces.append(MergePiece(piece, steps))
    return pieces


# --- attention ------------------------------------------------------------------------


@dataclass
class AttentionResult:
    tokens: list[TokenView]
    n_layers: int
    n_heads: int
    layer: int
    heads: list[int]
    weights: list[Any]  # per returned head, T x T
    average: Any  # T x T, the mean over all heads of the layer


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
        tokens=token_views(tokenizer, ids),
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


@dataclass
class NextTokenResult:
    prompt: list[TokenView]
    text: str
    choices: list[tuple[TokenView, float, float]]  # token, probability, logit
    entropy: float
    greedy: TokenView


def prompt_ids(checkpoint: Any, text: str | None, token_ids: list[int] | None, chat_template: bool) -> list[int]:
    """The prompt as token ids: ``token_ids`` as given, or ``text`` encoded (as a user turn when ``chat_template``)."""
    from app.chat import encode_prompt

    tokenizer = checkpoint.tokenizer
    if token_ids is not None:
        check_token_ids(tokenizer, token_ids, checkpoint.config.vocab_size)
        ids = list(token_ids)
    else:
        assert text is not None
        _check_chars(text)
        if chat_template:
            ids = encode_prompt(checkpoint, [{"role": "user", "content": text}])
        else:
            ids = tokenizer.encode(text, allowed_special="all")
    _check_tokens(ids, min(MAX_PROMPT_TOKENS, checkpoint.config.context_length), "the prompt")
    return ids


def next_token_distribution(checkpoint: Any, ids: list[int], sampling: SamplingConfig, k: int) -> NextTokenResult:
    """The k most likely next tokens under ``sampling``, the distribution's entropy and the greedy choice."""
    tokenizer = checkpoint.tokenizer
    result = next_token(checkpoint.model, ids, sampling, k=k)
    return NextTokenResult(
        prompt=token_views(tokenizer, ids),
        text=tokenizer.decode(ids),
        choices=[(token_view(tokenizer, c.token_id), c.probability, c.logit) for c in result.choices],
        entropy=result.entropy,
        greedy=token_view(tokenizer, result.greedy_id),
    )


# --- a stored answer, token by token ---------------------------------------------------


@dataclass
class AnswerProbabilities:
    prompt_tokens: int
    tokens: list[tuple[TokenView, float | None]]
    mean_logprob: float | None


def answer_probabilities(checkpoint: Any, prompt: list[int], answer: str) -> AnswerProbabilities:
    """How likely the model found each token of ``answer`` after ``prompt`` (teacher forcing, one pass).

    The answer's ids are its text encoded again: the ids that were sampled are not stored, and
    re-encoding can split a few spots differently than sampling did.
    """
    tokenizer = checkpoint.tokenizer
    ids = tokenizer.encode(answer, allowed_special="all")
    probs = token_probabilities(checkpoint.model, prompt, ids)
    known = [p for p in probs if not math.isnan(p) and p > 0]
    mean = sum(math.log(p) for p in known) / len(known) if known else None
    return AnswerProbabilities(
        prompt_tokens=len(prompt),
        tokens=[(token_view(tokenizer, i), _round(p)) for i, p in zip(ids, probs)],
        mean_logprob=mean,
    )


# --- embeddings ------------------------------------------------------------------------


@dataclass
class EmbeddingPoint:
    word: str
    tokens: list[TokenView]
    x: float
    y: float


def embedding_projection(checkpoint: Any, words: list[str], leading_space: bool) -> tuple[list[EmbeddingPoint], list[float]]:
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
        EmbeddingPoint(w, token_views(tokenizer, g), round(float(x), DECIMALS), round(float(y), DECIMALS))
        for w, g, (x, y) in zip(cleaned, groups, coords.tolist())
    ]
    return points, [round(float(r), DECIMALS) for r in ratios]


def _language_model(checkpoint: Any) -> Any:
    return getattr(checkpoint.model, "backbone", checkpoint.model)


# --- classifier explanation -------------------------------------------------------------


@dataclass
class Explanation:
    label: str
    probabilities: dict[str, float]
    target: str
    tokens: list[TokenView]
    gradient_x_input: list[float]
    last_token_attention: list[float]
    truncated: bool


def explain_classification(checkpoint: Any, text: str, max_chars: int) -> Explanation:
    """Which tokens moved the classifier: gradient x input towards the spam class, and last-token attention.

    The text is cut to the classifier's ``max_length`` tokens exactly as classification cuts it,
    so the explanation is of the decision the classify endpoint reports.
    """
    from app.chat import neutralize_specials

    _check_chars(text, limit=max_chars)
    tokenizer = checkpoint.tokenizer
    labels = list(checkpoint.labels or [])
    text = neutralize_specials(text, getattr(tokenizer, "special_tokens", None))
    max_length = int(checkpoint.metadata.get("max_length") or checkpoint.config.context_length)
    all_ids = tokenizer.encode(text)
    ids = all_ids[:max_length]
    _check_tokens(ids, max_length, "the text")
    classifier = checkpoint.model
    with torch.inference_mode():
        device = next(classifier.parameters()).device
        probs = classifier(torch.tensor([ids], device=device)).float().softmax(-1)[0].tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    target = labels.index("spam") if "spam" in labels else best
    return Explanation(
        label=labels[best] if labels else str(best),
        probabilities={(labels[i] if labels else str(i)): p for i, p in enumerate(probs)},
        target=labels[target] if labels else str(target),
        tokens=token_views(tokenizer, ids),
        gradient_x_input=[round(s, 6) for s in input_x_gradient(classifier, ids, target)],
        last_token_attention=[round(a, DECIMALS) for a in last_token_attention(classifier, ids)],
        truncated=len(all_ids) > len(ids),
    )


# --- running off the event loop --------------------------------------------------------


class LabRunner:
    """Runs blocking Lab measurements off the event loop: on the worker of the model they read
    (a served checkpoint among their arguments), else in a thread, one at a time."""

    def __init__(self, state: Any = None) -> None:
        self._state = state  # the app's state; its registry is looked up per call (a restart replaces it)
        self._limiter: anyio.CapacityLimiter | None = None

    def worker_for(self, args: Sequence[Any]) -> Any:
        """The worker serving a checkpoint passed in ``args``, or None."""
        models = getattr(self._state, "models", None)
        for slot in getattr(models, "slots", {}).values():
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


def lab_runner(state: Any) -> LabRunner:
    """The app's runner (``app.state.lab``), made on first use."""
    runner = getattr(state, "lab", None)
    if runner is None:
        runner = state.lab = LabRunner(state)
    return runner
