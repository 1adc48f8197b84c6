"""Text generation: the one decoding loop every model family and caller shares.

The loop follows the book's chapter 5 ``generate`` (crop to the context,
take the last logits, sample, append) with what serving needs on top: a KV
cache (prefill the prompt once, then one token per step), several prompts at
once (left padding plus an attention mask), stop tokens and stop strings, and
a streaming iterator of text that never splits a UTF-8 character.

This is the plain loop. A server wraps the model in ``core.fast.serving``'s
decoder, which passes faster output layers into the same loop (``step``), or
decodes speculatively, from CUDA graphs or from a kept cache; none of that is
needed to read this file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass, field

import torch

from core.generation.sampling import Penalties, SamplingConfig, make_generator, sample
from core.model import GPTModel, KVCache
from core.tokenizer.streaming import StreamDecoder


class ContextLengthError(ValueError):
    """A prompt that does not fit the model's context window."""


@dataclass
class GenerationConfig(SamplingConfig):
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    use_cache: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.stop_strings = tuple(s for s in self.stop_strings if s)


@dataclass
class StreamChunk:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # None while running, then "stop" or "length"


def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def check_prompt(prompt_ids: list[int], context_length: int) -> None:
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if len(prompt_ids) > context_length:
        raise ContextLengthError(
            f"the prompt has {len(prompt_ids)} tokens but the model's context window is {context_length}; "
            "shorten the prompt"
        )


# What one decoding pass computes: the logits (B, 1, vocab) after ``ids`` (B, T), given the cache
# (which may already hold earlier tokens), the (B, S) mask of real tokens when rows are left-padded,
# and whether the caller only takes the argmax. The plain model's pass is ``model_step``; a serving
# decoder (``core.fast.serving``) passes its faster one to the same loop.
StepFn = Callable[[torch.Tensor, "KVCache | None", "torch.Tensor | None", bool], torch.Tensor]


def model_step(model: GPTModel) -> StepFn:
    def step(ids: torch.Tensor, cache: KVCache | None, mask: torch.Tensor | None, greedy: bool) -> torch.Tensor:
        return model(ids, cache=cache, attention_mask=mask, last_only=True)

    return step


def padding_mask(prompts: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The (B, L) mask of real tokens when prompts are left-padded to one length L; None when all are as long."""
    L = max(len(p) for p in prompts)
    if all(len(p) == L for p in prompts):
        return None
    mask = torch.ones(len(prompts), L, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        mask[row, : L - len(prompt)] = 0
    return mask


@torch.inference_mode()
def decode_steps(
    model: GPTModel, prompts: list[list[int]], cfg: GenerationConfig, *, cache: KVCache | None = None,
    step: StepFn | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of each prompt (None once that prompt has stopped).

    A prompt stops on one of ``cfg.stop_token_ids`` (which is yielded) or after
    ``cfg.max_new_tokens``. Rows are left-padded to a common length and masked,
    so batched results equal one-prompt-at-a-time results.

    ``cache`` (one prompt), if given, has room for the prompt and the new tokens and may hold the
    prompt's first ``cache.length`` tokens already; ``step`` replaces the model's own pass.
    """
    C = model.cfg.context_length
    for prompt in prompts:
        check_prompt(prompt, C)
    step = step or model_step(model)
    device, dtype = _device_dtype(model)
    B, L = len(prompts), max(len(p) for p in prompts)
    # One buffer for the prompt and every token to come: appending a token is a
    # write into it, where torch.cat would copy the whole sequence each step.
    total = L + cfg.max_new_tokens
    seq = torch.zeros(B, total, dtype=torch.long, device=device)
    valid = torch.ones(B, total, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        seq[row, L - len(prompt):L] = torch.tensor(prompt, device=device)
        valid[row, : L - len(prompt)] = 0
    padded = any(len(p) < L for p in prompts)
    if cache is None and cfg.use_cache:
        # Size the cache for this request, not the whole context window: a long-context
        # model (Llama 3.2: 131,072 positions) would otherwise allocate gigabytes.
        cache = KVCache(model.cfg, B, min(C, total), device, dtype)
    generator = make_generator(cfg, device)
    penalties = Penalties(cfg, prompts, model.cfg.vocab_size, device) if cfg.penalized else None
    # A faster output layer may compute only the logits that can be the argmax; penalties move
    # the argmax, so they need every logit.
    argmax_only = cfg.greedy and penalties is None
    stops = set(cfg.stop_token_ids)
    finished = [False] * B

    n = L  # tokens in seq so far
    for _ in range(cfg.max_new_tokens):
        if cache is not None and n <= C:
            # Prefill the whole prompt once, then feed one token per step.
            logits = step(seq[:, cache.length:n], cache, valid[:, :n] if padded else None, argmax_only)
        else:
            # Past the context window (or without a cache) the model sees the
            # last C tokens afresh each step, as in the book's generate().
            window = slice(max(0, n - C), n)
            logits = step(seq[:, window], None, valid[:, window] if padded else None, argmax_only)
        last = logits[:, -1] if penalties is None else penalties.apply(logits[:, -1])
        token = sample(last, cfg, generator)
        if penalties is not None:
            penalties.update(token)
        ids = token.tolist()  # the one host sync per step: callers need the ids
        yield [None if done else t for t, done in zip(ids, finished)]
        finished = [done or t in stops for t, done in zip(ids, finished)]
        if all(finished):
            return
        seq[:, n] = token
        n += 1


def generate(model: GPTModel, prompts: list[list[int]], cfg: GenerationConfig) -> list[list[int]]:
    """New token ids for each prompt, without the prompt and without the stop token."""
    return collect(decode_steps(model, prompts, cfg), len(prompts), cfg)


def collect(steps: Iterator[list[int | None]], rows: int, cfg: GenerationConfig) -> list[list[int]]:
    """The token ids of each row that ``steps`` (as :func:`decode_steps` yields them) generated, stop tokens left out."""
    outputs: list[list[int]] = [[] for _ in range(rows)]
    stops = set(cfg.stop_token_ids)
    for step in steps:
        for row, token in enumerate(step):
            if token is not None and token not in stops:
                outputs[row].append(token)
    return outputs


def first_stop(text: str, stop_strings: tuple[str, ...]) -> int:
    """Where the earliest stop string starts in text, or -1."""
    found = [at for at in (text.find(stop) for stop in stop_strings) if at >= 0]
    return min(found, default=-1)


def held_back(text: str, stop_strings: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that could still grow into a stop string."""
    longest = 0
    for stop in stop_strings:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def stream(model: GPTModel, tokenizer, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[StreamChunk]:
    """Generate for one prompt, yielding text as it becomes final (see :func:`text_chunks`).
    Closing the iterator stops generation."""
    return text_chunks(tokenizer, (step[0] for step in decode_steps(model, [prompt_ids], cfg)), cfg)


class TextStream:
    """One answer's token ids in, its final text out: what :func:`text_chunks` and the serving engine
    (``core.serving``) both turn tokens into.

    Text is held back while it could be the start of a stop string, and bytes
    while they are an incomplete UTF-8 character, so what has been handed out is
    never taken back.
    """

    def __init__(self, tokenizer, cfg: GenerationConfig) -> None:
        self._decoder = StreamDecoder(tokenizer)
        self._pending = ""
        self._stop_ids = set(cfg.stop_token_ids)
        self._stop_strings = cfg.stop_strings

    def push(self, token: int) -> StreamChunk:
        """The chunk for one new token; its ``finish_reason`` is "stop" when the answer ends there."""
        if token in self._stop_ids:
            return StreamChunk(self._pending + self._decoder.flush(), [token], "stop")
        pending = self._pending + self._decoder.push(token)
        at = first_stop(pending, self._stop_strings)
        if at >= 0:
            return StreamChunk(pending[:at], [token], "stop")
        keep = held_back(pending, self._stop_strings)
        self._pending = pending[len(pending) - keep:]
        return StreamChunk(pending[: len(pending) - keep], [token])

    def finish(self) -> StreamChunk:
        """The last chunk of an answer cut by its length limit."""
        # Bytes of an unfinished character are only decoded (as U+FFFD) now, and a stop string
        # may end in them: then the answer was cut by that stop, not by the length limit.
        tail = self._pending + self._decoder.flush()
        at = first_stop(tail, self._stop_strings)
        return StreamChunk(tail if at < 0 else tail[:at], [], "length" if at < 0 else "stop")


def text_chunks(tokenizer, tokens: Iterator[int], cfg: GenerationConfig) -> Iterator[StreamChunk]:
    """The text of one sequence's new ``tokens`` as it becomes final (:class:`TextStream`).

    The last chunk carries ``finish_reason``. Closing the iterator closes ``tokens``,
    which stops their generation.
    """
    text = TextStream(tokenizer, cfg)
    with closing(tokens) if hasattr(tokens, "close") else nullcontext():
        for token in tokens:
            chunk = text.push(token)
            yield chunk
            if chunk.finish_reason is not None:
                return
    yield text.finish()


def generate_text(model: GPTModel, tokenizer, prompt_ids: list[int], cfg: GenerationConfig) -> str:
    return "".join(chunk.text for chunk in stream(model, tokenizer, prompt_ids, cfg))
