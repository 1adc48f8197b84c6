"""Text generation: the one decoding loop every model family and caller shares.

The loop follows the book's chapter 5 ``generate`` (crop to the context,
take the last logits, sample, append) with what serving needs on top: a KV
cache (prefill the prompt once, then one token per step), several prompts at
once (left padding plus an attention mask), stop tokens and stop strings, and
a streaming iterator of text that never splits a UTF-8 character. A model
that ``core.fast.transforms`` gave a draft decodes one sequence speculatively
(``core.fast.speculative``): the same greedy tokens, or sampled tokens of the same
distribution, in fewer full passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from core.model.kv_cache import KVCache
from core.model import GPTModel
from core.generation.sampling import SamplingConfig, make_generator, sample
from core.fast.speculative import speculative_tokens
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


@torch.inference_mode()
def decode_steps(model: GPTModel, prompts: list[list[int]], cfg: GenerationConfig) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of each prompt (None once that prompt has stopped).

    A prompt stops on one of ``cfg.stop_token_ids`` (which is yielded) or after
    ``cfg.max_new_tokens``. Rows are left-padded to a common length and masked,
    so batched results equal one-prompt-at-a-time results.
    """
    C = model.cfg.context_length
    for prompt in prompts:
        check_prompt(prompt, C)
    store = _prefix_store(model, prompts, cfg)
    if store is None:
        yield from _decode(model, prompts, cfg)
        return
    # One prompt on a model that keeps recent caches (core.fast.prefix_cache): start from the longest
    # stored prefix of the prompt, and keep this request's cache for the next one.
    prompt = prompts[0]
    cache = store.take(model, prompt, len(prompt) + cfg.max_new_tokens)
    emitted: list[int] = []
    try:
        for step in _decode(model, prompts, cfg, cache):
            emitted.append(step[0])
            yield step
    finally:
        store.put(prompt + emitted, cache)


def _one_cached_sequence(model: GPTModel, prompts: list[list[int]], cfg: GenerationConfig) -> bool:
    """One prompt, decoded with a cache, that stays inside the context window, in eval mode: where
    speculative decoding and kept caches apply."""
    return (
        len(prompts) == 1 and cfg.use_cache and not model.training
        and len(prompts[0]) + cfg.max_new_tokens <= model.cfg.context_length
    )


def _prefix_store(model: GPTModel, prompts: list[list[int]], cfg: GenerationConfig):
    store = getattr(model, "prefix_cache", None)
    # A model replaying CUDA graphs decodes over caches of its own (core.fast.cuda_graphs).
    graphed = getattr(model, "decode_graphs", None) is not None
    return store if store is not None and not graphed and _one_cached_sequence(model, prompts, cfg) else None


def _decode(
    model: GPTModel, prompts: list[list[int]], cfg: GenerationConfig, cache: KVCache | None = None
) -> Iterator[list[int | None]]:
    """decode_steps' loop; ``cache`` (one prompt) may already hold the prompt's first tokens."""
    C = model.cfg.context_length
    if _speculates(model, prompts, cfg):
        for token in speculative_tokens(model, model.draft, prompts[0], cfg, cache):
            yield [token]
        return
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
    graphs = getattr(model, "decode_graphs", None)
    graphed = graphs is not None and cfg.use_cache and not model.training
    with graphs.session(B, total) if graphed else nullcontext() as static:
        if static is not None:
            # A CUDA model's steps replay a recorded graph (core.fast.cuda_graphs) over a cache of its own.
            static.begin(valid[:, :L] if padded else None)
            cache = static.cache
        elif cache is None:
            # Size the cache for this request, not the whole context window: a long-context
            # model (Llama 3.2: 131,072 positions) would otherwise allocate gigabytes.
            cache = KVCache(model.cfg, B, min(C, total), device, dtype) if cfg.use_cache else None
        generator = make_generator(cfg, device)
        stops = set(cfg.stop_token_ids)
        finished = [False] * B

        n = L  # tokens in seq so far
        for _ in range(cfg.max_new_tokens):
            if static is not None and cache.length:
                logits = static.step(seq[:, n - 1])
            elif cache is not None and n <= C:
                # Prefill the whole prompt once, then feed one token per step.
                logits = model(
                    seq[:, cache.length:n], cache=cache, attention_mask=valid[:, :n] if padded else None,
                    last_only=True, argmax_only=cfg.greedy,
                )
            else:
                # Past the context window (or without a cache) the model sees the
                # last C tokens afresh each step, as in the book's generate().
                window = slice(max(0, n - C), n)
                logits = model(
                    seq[:, window], attention_mask=valid[:, window] if padded else None,
                    last_only=True, argmax_only=cfg.greedy,
                )
            token = sample(logits[:, -1], cfg, generator)
            ids = token.tolist()  # the one host sync per step: callers need the ids
            yield [None if done else t for t, done in zip(ids, finished)]
            finished = [done or t in stops for t, done in zip(ids, finished)]
            if all(finished):
                return
            seq[:, n] = token
            n += 1


def _speculates(model: GPTModel, prompts: list[list[int]], cfg: GenerationConfig) -> bool:
    # On a model with a draft (core.fast.transforms installs one): the model checks the draft's guesses, so
    # greedy tokens are the same and sampled ones have the same distribution (other draws for a
    # seed than token by token).
    return getattr(model, "draft", None) is not None and _one_cached_sequence(model, prompts, cfg)


def generate(model: GPTModel, prompts: list[list[int]], cfg: GenerationConfig) -> list[list[int]]:
    """New token ids for each prompt, without the prompt and without the stop token."""
    outputs: list[list[int]] = [[] for _ in prompts]
    stops = set(cfg.stop_token_ids)
    for step in decode_steps(model, prompts, cfg):
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


class TextStream:
    """One answer's token ids in, its final text out: what :func:`stream` and the serving engine
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


def stream(model: GPTModel, tokenizer, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[StreamChunk]:
    """Generate for one prompt, yielding text as it becomes final (:class:`TextStream`).

    The last chunk carries ``finish_reason``. Closing the iterator stops generation.
    """
    text = TextStream(tokenizer, cfg)
    for step in decode_steps(model, [prompt_ids], cfg):
        chunk = text.push(step[0])
        yield chunk
        if chunk.finish_reason is not None:
            return
    yield text.finish()


def generate_text(model: GPTModel, tokenizer, prompt_ids: list[int], cfg: GenerationConfig) -> str:
    return "".join(chunk.text for chunk in stream(model, tokenizer, prompt_ids, cfg))
