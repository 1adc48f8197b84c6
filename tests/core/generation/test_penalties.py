"""Repetition, frequency and presence penalties change the logits as their definitions say, and
decoding with them equals a loop written from those definitions, token by token."""

from __future__ import annotations

import pytest
import torch

from core.fast.prefix_cache import PrefixCache
from core.fast.serving import ServingDecoder
from core.generation.generate import GenerationConfig, generate
from core.generation.sampling import Penalties, SamplingConfig
from fused_models import tiny_model


def by_definition(logits: list[float], seen: set[int], generated: list[int], cfg: SamplingConfig) -> list[float]:
    """The penalties written out for one row, element by element."""
    out = []
    for j, z in enumerate(logits):
        if j in seen and cfg.repetition_penalty != 1.0:
            z = z / cfg.repetition_penalty if z > 0 else z * cfg.repetition_penalty
        count = generated.count(j)
        z -= count * cfg.frequency_penalty + (count > 0) * cfg.presence_penalty
        out.append(z)
    return out


def test_each_penalty_moves_the_logits_as_defined():
    cfg = SamplingConfig(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    penalties = Penalties(cfg, [[3]], vocab_size=5)
    for token in (0, 1, 1):
        penalties.update(torch.tensor([token]))
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5]])
    got = penalties.apply(logits)[0].tolist()
    # 0: seen, positive, generated once: 2/2 - 0.5 - 0.25; 1: seen, negative, twice: -1*2 - 1 - 0.25;
    # 2 and 4: never seen; 3: in the prompt only, so repetition alone: 3/2.
    assert got == pytest.approx([0.25, -3.25, 0.5, 1.5, -0.5])
    assert got == pytest.approx(by_definition(logits[0].tolist(), {3, 0, 1}, [0, 1, 1], cfg))


def test_no_penalty_leaves_the_logits_alone_and_bad_values_are_refused():
    assert not SamplingConfig().penalized
    logits = torch.randn(2, 7)
    assert torch.equal(Penalties(SamplingConfig(), [[1], [2]], 7).apply(logits), logits)
    for bad in ({"repetition_penalty": 0.0}, {"repetition_penalty": float("inf")}, {"frequency_penalty": 2.5},
                {"presence_penalty": -3.0}, {"presence_penalty": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("penalty", [{"repetition_penalty": 1000.0}, {"frequency_penalty": 1.5},
                                     {"presence_penalty": 2.0, "frequency_penalty": 0.5}])
def test_greedy_decoding_with_penalties_follows_the_definition_token_by_token(family, penalty):
    model = tiny_model(family, context_length=64)
    prompt = [5, 9, 5, 2, 11]
    cfg = GenerationConfig(max_new_tokens=20, **penalty)
    generated: list[int] = []
    with torch.inference_mode():
        for _ in range(cfg.max_new_tokens):
            logits = model(torch.tensor([prompt + generated]))[0, -1].tolist()  # no cache: a fresh pass
            scores = by_definition(logits, set(prompt + generated), generated, cfg)
            generated.append(max(range(len(scores)), key=scores.__getitem__))
    assert generate(model, [prompt], cfg)[0] == generated
    plain = generate(model, [prompt], GenerationConfig(max_new_tokens=20))[0]
    assert plain != generated  # the penalty changed the answer: the test sees what it tests
    # A serving decoder that keeps caches (and would speculate) decodes the same penalized tokens.
    kept = ServingDecoder(model, prefix_cache=PrefixCache())
    assert kept.generate([prompt], cfg)[0] == generated
    assert kept.generate([prompt + generated[:3]], cfg)[0] == generate(model, [prompt + generated[:3]], cfg)[0]


def test_penalties_apply_per_row_in_a_batch():
    model = tiny_model("gpt2", context_length=64)
    prompts = [[5, 9, 5, 2, 11], [7, 7, 7]]
    cfg = GenerationConfig(max_new_tokens=12, repetition_penalty=1.5, presence_penalty=1.0)
    assert generate(model, prompts, cfg) == [generate(model, [p], cfg)[0] for p in prompts]


def test_the_engine_applies_each_sequences_penalties_as_the_plain_loop_does():
    from core.serving import Engine
    from core.tokenizer import gpt2_tokenizer

    model = tiny_model("llama", context_length=96)
    prompts = [[5, 9, 5, 2, 11], [7, 7, 7], [13, 14, 15]]
    configs = [GenerationConfig(max_new_tokens=12, repetition_penalty=1000.0),
               GenerationConfig(max_new_tokens=12),  # unpenalized, decoded beside the others
               GenerationConfig(max_new_tokens=12, temperature=1.0, seed=3, frequency_penalty=2.0, presence_penalty=1.0)]
    engine = Engine(model, gpt2_tokenizer(), max_batch=3)
    handles = [engine.submit(p, c) for p, c in zip(prompts, configs)]
    while engine.step():
        pass
    got = [[t for chunk in h for t in chunk.token_ids] for h in handles]
    assert got == [generate(model, [p], c)[0] for p, c in zip(prompts, configs)]
    assert got[0] != generate(model, [prompts[0]], configs[1])[0]  # the penalty mattered
