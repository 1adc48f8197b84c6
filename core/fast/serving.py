"""The serving decoder: a trained model plus everything a server adds to decode it fast.

``core.model.GPTModel`` holds weights and a forward pass, and
``core.generation.generate`` is the plain decoding loop over it. A server
wants more, and all of it lives here, on an object that wraps the model
instead of on the model itself:

- faster output layers (``head`` for full logits, ``argmax_head`` where the
  caller takes only the argmax: the screened head of ``core.fast.screened_head``
  or GGUF blocks of ``core.fast.gguf_matvec``), passed into the plain loop as
  its ``step``;
- a draft for speculative decoding of one sequence (``core.fast.speculative``);
- CUDA graphs that replay decoding steps on a GPU (``core.fast.cuda_graphs``);
- a store of recent requests' KV caches, so a chat's next turn prefills only
  its new message (``core.fast.prefix_cache``).

:meth:`ServingDecoder.decode_steps` picks the strategy once per request, from
what is installed and what the request is, and the rest of the loop is the
plain one. ``core.fast.transforms.make_fast`` builds a decoder with the add-ons
that fit a model; ``ServingDecoder(model)`` alone decodes exactly as the plain loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from core.fast.speculative import speculative_tokens
from core.generation.generate import (
    GenerationConfig,
    StreamChunk,
    check_prompt,
    collect,
    decode_steps,
    padding_mask,
    text_chunks,
)
from core.model import GPTModel, KVCache


@dataclass
class FastReport:
    """What ``make_fast`` installed, and why it skipped the rest."""

    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # transform -> why
    compile_seconds: float | None = None

    def __str__(self) -> str:
        parts = self.applied + [f"no {k} ({v})" for k, v in self.skipped.items()]
        if self.compile_seconds is not None:
            parts.append(f"compiled in {self.compile_seconds:.0f} s")
        return ", ".join(parts) or "nothing"


class ServingDecoder:
    """Decodes with ``model`` and the serving add-ons installed on this object (see the module docstring).

    ``head(normed_hidden, head_weight)`` computes the full logits, ``argmax_head``
    the same or logits that keep the argmax exact (greedy decoding); None for
    either means the plain product. ``draft``, ``graphs`` and ``prefix_cache``
    are None until something installs them.
    """

    def __init__(self, model: GPTModel, *, prefix_cache=None) -> None:
        self.model = model
        self.head: nn.Module | None = None
        self.argmax_head: nn.Module | None = None
        self.draft = None
        self.graphs = None
        self.prefix_cache = prefix_cache
        self.report = FastReport()

    @property
    def cfg(self):
        return self.model.cfg

    # -- one forward pass --------------------------------------------------------

    def logits(self, hidden: torch.Tensor, argmax_only: bool = False) -> torch.Tensor:
        """The output layer on the last blocks' ``hidden`` states, through the installed heads."""
        model = self.model
        head = self.argmax_head if argmax_only and self.argmax_head is not None else self.head
        normed = model.final_norm(hidden)
        if head is None:
            return nn.functional.linear(normed, model.head_weight)
        return head(normed, model.head_weight)

    def __call__(
        self, input_ids: torch.Tensor, *, cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
        last_only: bool = False, argmax_only: bool = False,
    ) -> torch.Tensor:
        """The model's forward pass (its pieces: context, embed, blocks) with this decoder's output layer.

        ``argmax_only``: the caller takes only the argmax, so logits that cannot be the
        maximum may come back as -inf (the screened head computes only the others exactly)."""
        model = self.model
        if self.head is None and self.argmax_head is None:
            # The model's own forward: the one torch.compile compiled, where make_fast compiled it.
            return model(input_ids, cache=cache, attention_mask=attention_mask, last_only=last_only)
        ctx = model.context(input_ids, cache=cache, attention_mask=attention_mask)
        hidden, _ = model.run_blocks(model.embed(input_ids, ctx), ctx)
        if last_only:
            hidden = hidden[:, -1:]
        return self.logits(hidden, argmax_only)

    def step(self, ids: torch.Tensor, cache: KVCache | None, mask: torch.Tensor | None, greedy: bool) -> torch.Tensor:
        """The plain loop's ``step`` (``core.generation.generate.StepFn``) through this decoder's heads."""
        return self(ids, cache=cache, attention_mask=mask, last_only=True, argmax_only=greedy)

    # -- decoding ----------------------------------------------------------------

    @torch.inference_mode()
    def decode_steps(self, prompts: list[list[int]], cfg: GenerationConfig) -> Iterator[list[int | None]]:
        """What ``core.generation.generate.decode_steps`` yields, by the fastest way installed.

        CUDA graphs when a GPU model has them; else, for one prompt decoded with a cache
        inside the context window, from the longest kept prefix of the prompt (the cache is
        kept again afterwards) and speculatively when a draft is installed; else the plain loop.
        """
        model = self.model
        for prompt in prompts:
            check_prompt(prompt, model.cfg.context_length)
        if self.graphs is not None and cfg.use_cache and not model.training:
            yield from self._graphed(prompts, cfg)
        elif self._one_cached_sequence(prompts, cfg) and (self.prefix_cache is not None or self.draft is not None):
            yield from self._one_sequence(prompts[0], cfg)
        else:
            yield from decode_steps(model, prompts, cfg, step=self.step)

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> list[list[int]]:
        """New token ids for each prompt, as ``core.generation.generate.generate`` returns them."""
        return collect(self.decode_steps(prompts, cfg), len(prompts), cfg)

    def stream(self, tokenizer, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[StreamChunk]:
        """One prompt's text as it becomes final, as ``core.generation.generate.stream`` yields it."""
        return text_chunks(tokenizer, (step[0] for step in self.decode_steps([prompt_ids], cfg)), cfg)

    def _one_cached_sequence(self, prompts: list[list[int]], cfg: GenerationConfig) -> bool:
        """One prompt, decoded with a cache, that stays inside the context window, in eval mode:
        where speculative decoding and kept caches apply."""
        model = self.model
        return (
            len(prompts) == 1 and cfg.use_cache and not model.training
            and len(prompts[0]) + cfg.max_new_tokens <= model.cfg.context_length
        )

    def speculates(self, cfg: GenerationConfig) -> bool:
        """Whether one sequence decoded under ``cfg`` takes the draft: one is installed, and ``cfg``
        applies no penalties (the draft's checks know nothing of them)."""
        return self.draft is not None and not cfg.penalized

    def _one_sequence(self, prompt: list[int], cfg: GenerationConfig) -> Iterator[list[int | None]]:
        model = self.model
        capacity = len(prompt) + cfg.max_new_tokens
        if self.prefix_cache is not None:
            cache = self.prefix_cache.take(model, prompt, capacity)
        else:
            p = model.head_weight
            cache = KVCache(model.cfg, 1, capacity, p.device, p.dtype)
        if self.speculates(cfg):
            # The model checks the draft's guesses: the same greedy tokens, and sampled ones of the
            # same distribution (other draws for a seed than token by token).
            steps = ([token] for token in speculative_tokens(self, self.draft, prompt, cfg, cache))
        else:
            steps = decode_steps(model, [prompt], cfg, cache=cache, step=self.step)
        emitted: list[int] = []
        try:
            for step in steps:
                emitted.append(step[0])
                yield step
        finally:
            if self.prefix_cache is not None:
                self.prefix_cache.put(prompt + emitted, cache)

    def _graphed(self, prompts: list[list[int]], cfg: GenerationConfig) -> Iterator[list[int | None]]:
        # The prompt's pass runs as usual, into the graphs' own cache; each step after it is a replay.
        tokens = max(len(p) for p in prompts) + cfg.max_new_tokens
        with self.graphs.session(len(prompts), tokens) as static:
            if static is None:  # another request holds the graphs, or they cannot be recorded
                yield from decode_steps(self.model, prompts, cfg, step=self.step)
                return
            static.begin(padding_mask(prompts, static.cache.keys.device))

            def step(ids: torch.Tensor, cache: KVCache | None, mask: torch.Tensor | None, greedy: bool) -> torch.Tensor:
                if cache is static.cache and cache.length:
                    return static.step(ids[:, -1])
                return self.step(ids, cache, mask, greedy)

            yield from decode_steps(self.model, prompts, cfg, cache=static.cache, step=step)
