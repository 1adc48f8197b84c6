"""Greedy decoding in fewer full-precision passes: a bf16 draft of the model's own weights, verified in fp32.

Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a cheap
draft model proposes the next few tokens one by one, and the real model scores
all of them in one forward pass. For greedy decoding the rule is simple: keep
the drafted tokens up to the first one the real model would not have chosen,
then take the real model's own token there. Every token out is the real
model's argmax given the tokens before it, so the text is the real model's
greedy text, whatever the draft proposed; a good draft only makes it faster.

Why it pays on a CPU: a decoding step of GPT-2 small in fp32 reads 340 MB of
block weights for one token, and at up to eight rows the panel kernel
(``core.panel_linear``) reads them no slower than for one. So scoring eight
tokens in one pass costs about as much as one plain step, and if a draft costs
half a step, eight tokens cost about 0.5 x 7 + 1.1 steps instead of 8.

The draft here needs no second model: it is the same model reading its block
weights from bf16 panels (half the bytes; activations, sums and the KV cache
stay fp32) and scoring the vocabulary with the bf16 screen of the screened
output layer (``core.fast.ScreenedHead``). It shares the verifier's KV cache:
it writes its guesses' keys and values after the verified positions, and the
verifying pass overwrites them with the fp32 ones. On GPT-2 small with random
weights it guessed all of 128 greedy tokens (docs/performance.md).

It runs where the fused GPT-2 layers run (``core.decode_layer``: fp32 on the
CPU, weights as panels), for one sequence at a time and greedy decoding;
``core.generate`` takes it then and otherwise decodes token by token. Sampling
is left to the plain loop: speculative *sampling* is exact in distribution but
would draw other tokens than the plain loop for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from core.kv_cache import KVCache
from core.panel_linear import MAX_ROWS, Panels, kernels as panel_kernels

# Drafted tokens per verifying pass: the pass scores them and the token before
# them, and the panel kernel reads the weights once for up to eight rows.
MAX_DRAFT = MAX_ROWS - 1
# Below this share of drafted tokens accepted (judged after MIN_JUDGED), drafting
# costs more than it saves and the rest of the request decodes token by token.
MIN_ACCEPTANCE = 0.6
MIN_JUDGED = 16


class SelfDraft:
    """Drafts greedy tokens for an fp32 GPT-2 whose blocks are ``FusedGPT2Block``s, from a lower-precision
    panel copy of its own block and output weights: int8 with a scale per output (default) or bf16.
    The copies are rebuilt if a weight changes, as every panel copy is.

    ``counts`` adds up, over its life, the verifying passes, the tokens drafted
    and the drafted tokens the model accepted.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.int8, max_draft: int = MAX_DRAFT) -> None:
        from core.decode_layer import FusedGPT2Block

        if dtype not in (torch.int8, torch.bfloat16):
            raise ValueError(f"the draft reads int8 or bf16 panels, not {dtype}")
        if not 1 <= max_draft <= MAX_DRAFT:
            raise ValueError(f"max_draft must be 1 to {MAX_DRAFT}, got {max_draft}")
        if not all(isinstance(block, FusedGPT2Block) for block in model.blocks) or model.pos_emb is None:
            raise ValueError("the draft runs the fused GPT-2 layers: make_fast the fp32 model with panels first")
        self.dtype, self.max_draft = dtype, max_draft
        self._layers = [[Panels(dtype) for _ in block.linears()] for block in model.blocks]
        screen = getattr(model.argmax_head, "_panels", None)
        # The screened output layer already keeps a bf16 copy of the head: a bf16 draft shares it.
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

    def next_token(self, model: torch.nn.Module, token: int, position: int, cache: KVCache) -> int:
        """The draft's greedy guess after ``token`` at ``position``; its keys and values go into
        ``cache`` at ``position`` (``cache.length`` is left as it is)."""
        x = (model.tok_emb.weight[token] + model.pos_emb.weight[position]).view(1, 1, -1)
        for block, panels in zip(model.blocks, self._layers):
            x = block.decode(x, cache, position, panels=panels)
        h = model.final_norm(x).view(1, -1)
        weight = model.head_weight
        scores = panel_kernels().linear(h, self._head.of(weight), None, weight.shape[0])
        return int(scores.argmax())


def speculative_tokens(model: torch.nn.Module, draft: SelfDraft, prompt: list[int], max_new_tokens: int,
                       stop_token_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """The model's greedy tokens after ``prompt`` (a stop token is yielded, then nothing more),
    drafted by ``draft`` and verified by ``model`` up to eight at a time.

    The caller checks that the prompt and the new tokens fit the context window."""
    device = model.head_weight.device
    cache = KVCache(model.cfg, 1, len(prompt) + max_new_tokens, device, model.head_weight.dtype)
    if max_new_tokens == 0:
        return
    logits = model(torch.tensor([prompt], device=device), cache=cache, last_only=True, argmax_only=True)
    new = [int(logits[0, -1].argmax())]
    emitted, drafted, accepted = 0, 0, 0
    stops = set(stop_token_ids)
    while True:
        for token in new:
            yield token
            emitted += 1
            if token in stops or emitted == max_new_tokens:
                return
        # new[-1] is the next position's token, not yet in the cache; a pass may add up to
        # len(guesses) + 1 tokens, all of which must be wanted.
        k = min(draft.max_draft, max_new_tokens - emitted - 1)
        if drafted >= MIN_JUDGED and accepted < MIN_ACCEPTANCE * drafted or not draft.applies(model, cache):
            k = 0
        start, guesses = cache.length, []
        for i in range(k):
            guesses.append(draft.next_token(model, guesses[-1] if guesses else new[-1], start + i, cache))
        chunk = torch.tensor([new[-1:] + guesses], device=device)
        # One pass over the last token and the guesses (overwriting the guesses' keys and values).
        choices = model(chunk, cache=cache, argmax_only=True)[0].argmax(-1).tolist()
        kept = 0
        while kept < k and guesses[kept] == choices[kept]:
            kept += 1
        cache.length = start + kept + 1  # the rejected guesses' positions are written again later
        new = guesses[:kept] + [choices[kept]]
        drafted, accepted = drafted + k, accepted + kept
        draft.counts["passes"] += 1
        draft.counts["drafted"] += k
        draft.counts["accepted"] += kept
