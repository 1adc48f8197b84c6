"""Decoding in fewer full-precision passes: an int8 draft of the model's own weights, checked in fp32.

Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a cheap
draft proposes the next few tokens one by one, and the real model scores all
of them in one forward pass. Greedy: keep the drafted tokens up to the first
one the real model would not have chosen, then take the real model's own
token there, so the text is the real model's greedy text whatever the draft
proposed. Sampling: keep a drafted token x with probability min(1, p(x)/q(x))
(p the model's distribution there, after temperature, top-k and top-p; q the
draft's, which x was drawn from), and at the first one not kept draw from
max(0, p - q) renormalised: every token is distributed as the model's own
sampling would draw it, though a seed gives other draws than token by token.
A good draft only makes it faster.

Why it pays on a CPU: a decoding step of GPT-2 small in fp32 reads 340 MB of
block weights for one token, and at up to eight rows the panel kernel
(``core.fast.panels``) reads them no slower than for one. So scoring eight
tokens in one pass costs about one plain step, and with a draft costing a
fraction d of a step eight tokens cost about 7 d + 1 steps instead of 8
(measured costs: docs/performance.md, "Speculative decoding").

The draft needs no second model: :class:`SelfDraft` is the same model reading
an int8 copy of its block and output weights (a scale per output; a quarter of
the bytes; activations, sums and the KV cache stay fp32) through the fused
GPT-2 layers (``core.fast.fused_layers``). It shares the verifier's KV cache: it
writes its guesses' keys and values after the verified positions, and the
verifying pass overwrites them with the fp32 ones. How many of its guesses are
kept, on random and trained weights: docs/performance.md.

It runs where the fused GPT-2 layers run (fp32 on the CPU, weights as panels),
one sequence at a time: the serving decoder (``core.fast.serving``) takes it
for a lone request and otherwise decodes token by token, and the engine
(``core.serving.engine``) takes it, one verifying pass per step, while a
sequence runs alone. :class:`ModelDraft` drafts with a model of the same shape
through its ordinary forward instead (the model itself: every guess kept).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from core.fast.fused_layers import FusedGPT2Block
from core.fast.panels import MAX_ROWS, Panels, kernels as panel_kernels
from core.generation.generate import GenerationConfig
from core.generation.sampling import SamplingConfig, make_generator, next_token_probabilities, sample
from core.model import KVCache

# Drafted tokens per verifying pass: the pass scores them and the token before
# them, and the panel kernel reads the weights once for up to eight rows.
MAX_DRAFT = MAX_ROWS - 1
# Below this share of drafted tokens accepted (judged after MIN_JUDGED), drafting
# costs more than it saves and the rest of the request decodes token by token.
MIN_ACCEPTANCE = 0.6
MIN_JUDGED = 16


class SelfDraft:
    """Drafts tokens for an fp32 GPT-2 whose blocks are ``FusedGPT2Block``s, from a lower-precision
    panel copy of its own block and output weights: int8 with a scale per output (default) or bf16.
    The copies are rebuilt if a weight changes, as every panel copy is.

    ``counts`` adds up, over its life, the verifying passes, the tokens drafted
    and the drafted tokens the model accepted.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.int8, max_draft: int = MAX_DRAFT,
                 head_screen: Panels | None = None) -> None:
        if dtype not in (torch.int8, torch.bfloat16):
            raise ValueError(f"the draft reads int8 or bf16 panels, not {dtype}")
        if not 1 <= max_draft <= MAX_DRAFT:
            raise ValueError(f"max_draft must be 1 to {MAX_DRAFT}, got {max_draft}")
        if not drafts_for(model):
            raise ValueError("the draft runs the fused GPT-2 layers: make_fast the fp32 model with panels first")
        self.dtype, self.max_draft = dtype, max_draft
        self._layers = [[Panels(dtype) for _ in block.linears()] for block in model.blocks]
        # ``head_screen``: the bf16 panel copy of the output layer a screened head keeps, which a bf16 draft shares.
        screen = head_screen
        self._head = screen if dtype == torch.bfloat16 and screen is not None and screen.dtype == dtype else Panels(dtype)
        self.counts = {"passes": 0, "drafted": 0, "accepted": 0}

    def nbytes(self) -> int:
        """Bytes of the draft's weight copies built so far: what one drafted token reads."""
        copies = [p for layer in self._layers for p in layer] + [self._head]
        return sum(t.nbytes for p in copies if p.panels is not None for t in p.panels)

    def applies(self, model: torch.nn.Module, cache: KVCache) -> bool:
        """Whether the draft's kernels take this model and cache as they are now (fp32 on the CPU)."""
        weight = model.head_weight
        return (weight.dtype == torch.float32 and weight.device.type == "cpu"
                and cache.keys.dtype == torch.float32 and cache.keys.device.type == "cpu")

    def scores(self, model: torch.nn.Module, token: int, position: int, cache: KVCache) -> torch.Tensor:
        """The draft's logits (vocab,) for the token after ``token`` at ``position``; its keys and
        values go into ``cache`` at ``position`` (``cache.length`` is left as it is)."""
        x = (model.tok_emb.weight[token] + model.pos_emb.weight[position]).view(1, 1, -1)
        for block, panels in zip(model.blocks, self._layers):
            x = block.decode(x, cache, position, panels=panels)
        h = model.final_norm(x).view(1, -1)
        weight = model.head_weight
        return panel_kernels().linear(h, self._head.of(weight), None, weight.shape[0])[0]


def drafts_for(model: torch.nn.Module) -> bool:
    """Whether :class:`SelfDraft` runs on ``model``: a GPT-2 whose every block is a ``FusedGPT2Block``."""
    return model.pos_emb is not None and all(isinstance(block, FusedGPT2Block) for block in model.blocks)


class ModelDraft:
    """Drafts tokens with a model of the verifier's shape (its layers, key/value heads, head size and
    vocabulary) through that model's ordinary forward pass, writing its guesses' keys and values into
    the verifier's cache as :class:`SelfDraft` does. With the verifier itself as the draft every guess
    is the model's own token (each pass keeps them all): the reference any other draft's acceptance is
    measured against, and a draft that runs wherever the model runs, fused kernels or not.
    """

    def __init__(self, model: torch.nn.Module, max_draft: int = MAX_DRAFT) -> None:
        if not 1 <= max_draft <= MAX_DRAFT:
            raise ValueError(f"max_draft must be 1 to {MAX_DRAFT}, got {max_draft}")
        self.model, self.max_draft = model, max_draft
        self.counts = {"passes": 0, "drafted": 0, "accepted": 0}

    def applies(self, model: torch.nn.Module, cache: KVCache) -> bool:
        """Whether this draft can write ``cache`` (the verifier's): the same shapes, device and dtype."""
        a, b = self.model.cfg, model.cfg
        weight = self.model.head_weight
        return ((a.n_layers, a.kv_heads, a.head_dim, a.vocab_size) == (b.n_layers, b.kv_heads, b.head_dim, b.vocab_size)
                and weight.device == cache.keys.device and weight.dtype == cache.keys.dtype)

    def scores(self, model: torch.nn.Module, token: int, position: int, cache: KVCache) -> torch.Tensor:
        """The draft's logits (vocab,) for the token after ``token`` at ``position``, as :meth:`SelfDraft.scores`."""
        verified = cache.length
        cache.length = position
        try:
            ids = torch.tensor([[token]], device=cache.keys.device)
            return self.model(ids, cache=cache, last_only=True)[0, -1]
        finally:
            cache.length = verified


class Speculation:
    """One sequence's speculative decoding, one verifying pass at a time (:meth:`step`): the loop of
    :func:`speculative_tokens`, and the lone sequence's steps in ``core.serving.engine``.

    ``decoder`` is a ``core.fast.serving.ServingDecoder`` (its model's forward pass through its output
    layers), ``draft`` a :class:`SelfDraft` or :class:`ModelDraft`, ``generator`` the sequence's own.
    It gives drafting up when too few guesses are kept (``MIN_ACCEPTANCE``): its steps are then one
    token each, still through the verifying pass.
    """

    def __init__(self, decoder, draft, cfg: GenerationConfig, generator: torch.Generator | None) -> None:
        self.decoder, self.draft, self.cfg, self.generator = decoder, draft, cfg, generator
        self.drafted = self.accepted = 0

    def step(self, token: int, cache: KVCache, room: int) -> list[int]:
        """The tokens after ``token`` (the sequence's last, not yet in ``cache``): the guesses the model
        kept and its own token after them, ``room`` (>= 1) at most. ``cache`` has room for ``room`` more
        positions; its ``length`` counts those that hold the kept tokens afterwards."""
        cfg, draft, model = self.cfg, self.draft, self.decoder.model
        device = cache.keys.device
        k = min(draft.max_draft, room - 1)
        if self.drafted >= MIN_JUDGED and self.accepted < MIN_ACCEPTANCE * self.drafted or not draft.applies(model, cache):
            k = 0
        start, guesses, proposals = cache.length, [], []
        for i in range(k):
            scores = draft.scores(model, guesses[-1] if guesses else token, start + i, cache)
            if cfg.greedy:
                guesses.append(int(scores.argmax()))
            else:
                proposals.append(next_token_probabilities(scores[None], cfg)[0])
                guesses.append(int(torch.multinomial(proposals[-1], 1, generator=self.generator)))
        chunk = torch.tensor([[token] + guesses], device=device)
        # One pass over the last token and the guesses (overwriting the guesses' keys and values).
        logits = self.decoder(chunk, cache=cache, argmax_only=cfg.greedy)[0]
        if cfg.greedy:
            kept, new = _keep_greedy(logits, guesses)
        else:
            kept, new = _keep_sampled(logits, guesses, proposals, cfg, self.generator)
        cache.length = start + kept + 1  # the rejected guesses' positions are written again later
        self.drafted, self.accepted = self.drafted + k, self.accepted + kept
        draft.counts["passes"] += 1
        draft.counts["drafted"] += k
        draft.counts["accepted"] += kept
        return guesses[:kept] + [new]


def speculative_tokens(
    decoder, draft, prompt: list[int], cfg: GenerationConfig, cache: KVCache | None = None
) -> Iterator[int]:
    """The model's tokens after ``prompt`` as ``cfg`` asks (greedy or sampled, up to
    ``cfg.max_new_tokens``; a stop token is yielded, then nothing more), drafted by ``draft`` and
    verified up to eight at a time by ``decoder`` (see :class:`Speculation`).

    ``cache``, if given, has room for the prompt and the new tokens and may hold the prompt's first
    ``cache.length`` tokens already (core.fast.prefix_cache). The caller checks that the prompt and the
    new tokens fit the context window."""
    model = decoder.model
    device = model.head_weight.device
    if cache is None:
        cache = KVCache(model.cfg, 1, len(prompt) + cfg.max_new_tokens, device, model.head_weight.dtype)
    if cfg.max_new_tokens == 0:
        return
    generator = make_generator(cfg, device)
    rest = torch.tensor([prompt[cache.length:]], device=device)
    logits = decoder(rest, cache=cache, last_only=True, argmax_only=cfg.greedy)
    new = [int(sample(logits[:, -1], cfg, generator)[0])]
    speculation = Speculation(decoder, draft, cfg, generator)
    emitted = 0
    stops = set(cfg.stop_token_ids)
    while True:
        for token in new:
            yield token
            emitted += 1
            if token in stops or emitted == cfg.max_new_tokens:
                return
        # new[-1] is the next position's token, not yet in the cache; a pass may add up to
        # len(guesses) + 1 tokens, all of which must be wanted.
        new = speculation.step(new[-1], cache, cfg.max_new_tokens - emitted)


def _keep_greedy(logits: torch.Tensor, guesses: list[int]) -> tuple[int, int]:
    """How many guesses the model's argmax agrees with, and its own token after them."""
    choices = logits.argmax(-1).tolist()
    kept = 0
    while kept < len(guesses) and guesses[kept] == choices[kept]:
        kept += 1
    return kept, choices[kept]


def _keep_sampled(logits: torch.Tensor, guesses: list[int], proposals: list[torch.Tensor], cfg: SamplingConfig,
                  generator: torch.Generator | None) -> tuple[int, int]:
    """Leviathan et al.'s rule: guess x, drawn from the draft's q, is kept with probability
    min(1, p(x) / q(x)), p being what the model would sample from there; at the first guess
    not kept the token is drawn from max(0, p - q), normalised, and after the last from p.
    Each token out is then distributed as p, whatever q was."""
    p = next_token_probabilities(logits, cfg)  # (guesses + 1, vocab)
    for i, (x, q) in enumerate(zip(guesses, proposals)):
        if float(torch.rand(1, generator=generator)) * q[x] < p[i, x]:
            continue
        residual = (p[i] - q).clamp(min=0)
        total = float(residual.sum())
        # total > 0 whenever a guess is refused (p(x) < q(x) leaves mass where p > q); the
        # fallback only guards rounding.
        return i, int(torch.multinomial(residual / total if total > 0 else p[i], 1, generator=generator))
    return len(guesses), int(torch.multinomial(p[-1], 1, generator=generator))
