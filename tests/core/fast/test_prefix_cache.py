"""core.fast.prefix_cache: a prompt that continues an earlier request prefills only its new tokens, with the same tokens out."""

import copy

import pytest
import torch

from core.fast.fused_layers import kernels
from core.fast.serving import ServingDecoder
from core.fast.transforms import FastConfig, make_fast
from core.generation.generate import GenerationConfig, generate
from core.fast.prefix_cache import MIN_REUSE, PrefixCache, common_prefix
from fused_models import tiny_gpt2, tiny_model
from kernel_marks import needs_kernels

FIRST = list(range(3, 3 + 30))  # a first turn, longer than MIN_REUSE


@pytest.fixture(params=["gpt2", "llama"])
def family(request):
    return request.param


def keeping(model, max_bytes: int = 2**30) -> ServingDecoder:
    """A serving decoder of a copy of ``model`` that keeps recent caches."""
    return ServingDecoder(copy.deepcopy(model), prefix_cache=PrefixCache(max_bytes))


def conversation(plain, kept, cfg: GenerationConfig, turns: int = 3) -> list[int]:
    """Each turn's prompt is the last prompt, its answer and a new message; both models must answer
    alike every turn. Returns the last prompt."""
    prompt = FIRST
    for turn in range(turns):
        expected = generate(plain, [prompt], cfg)[0]
        assert kept.generate([prompt], cfg)[0] == expected, f"turn {turn}"
        prompt = prompt + expected + [50 + turn, 60 + turn, 70]
    return prompt


def test_the_next_turn_reuses_the_last_ones_cache_and_answers_alike(family):
    plain = tiny_model(family, context_length=200)
    kept = keeping(plain)
    conversation(plain, kept, GenerationConfig(max_new_tokens=12))
    store = kept.prefix_cache
    # Turn 2 reuses turn 1's prompt and 11 of its 12 answer tokens (the 12th was never run), turn 3 likewise.
    assert store.reused_tokens == (30 + 11) + (30 + 12 + 3 + 11)
    assert len(store) == 1  # each turn's cache replaced the one it extended


def test_sampled_turns_answer_alike(family):
    plain = tiny_model(family, context_length=200)
    conversation(plain, keeping(plain), GenerationConfig(max_new_tokens=12, temperature=1.2, top_k=30, seed=5))


def test_a_prompt_sharing_only_its_start_copies_that_much_and_leaves_the_entry(family):
    plain = tiny_model(family, context_length=200)
    kept = keeping(plain)
    cfg = GenerationConfig(max_new_tokens=8)
    kept.generate([FIRST], cfg)
    other = FIRST[:20] + [90, 91, 92]  # an edited message, or another chat with the same preamble
    assert kept.generate([other], cfg) == generate(plain, [other], cfg)
    assert kept.prefix_cache.reused_tokens == 20
    assert len(kept.prefix_cache) == 2  # the first conversation's cache is still there, whole
    assert kept.generate([FIRST], cfg) == generate(plain, [FIRST], cfg)  # the same prompt again
    assert kept.prefix_cache.reused_tokens == 20 + len(FIRST) - 1


def test_conversations_sharing_a_preamble_keep_their_own_caches(family):
    plain = tiny_model(family, context_length=300)
    kept = keeping(plain)
    cfg = GenerationConfig(max_new_tokens=10)
    preamble = FIRST[:20]
    a, b = preamble + [40, 41, 42, 43], preamble + [50, 51, 52, 53]
    answer_a = kept.generate([a], cfg)[0]
    kept.generate([b], cfg)  # copies the preamble from a's cache
    a2 = a + answer_a + [60, 61]
    before = kept.prefix_cache.reused_tokens
    assert kept.generate([a2], cfg) == generate(plain, [a2], cfg)
    assert kept.prefix_cache.reused_tokens - before == len(a) + len(answer_a) - 1  # a's own cache, not b's


def test_the_same_prompt_again_runs_only_its_last_token(family):
    plain = tiny_model(family, context_length=200)
    kept = keeping(plain)
    cfg = GenerationConfig(max_new_tokens=6)
    for _ in range(2):
        assert kept.generate([FIRST], cfg) == generate(plain, [FIRST], cfg)
    assert kept.prefix_cache.reused_tokens == len(FIRST) - 1


def test_a_longer_next_turn_gets_a_bigger_cache(family):
    plain = tiny_model(family, context_length=200)
    kept = keeping(plain)
    kept.generate([FIRST], GenerationConfig(max_new_tokens=4))
    longer = GenerationConfig(max_new_tokens=60)  # needs more room than the first cache has
    prompt = FIRST + [40, 41]
    assert kept.generate([prompt], longer) == generate(plain, [prompt], longer)
    assert kept.prefix_cache.reused_tokens == len(FIRST)


@pytest.mark.parametrize("room", [4, 60])  # the kept cache is big enough / a bigger one is made
def test_a_taken_cache_gives_a_fresh_prefills_logits(family, room):
    plain = tiny_model(family, context_length=200)
    kept = keeping(plain)
    kept.generate([FIRST], GenerationConfig(max_new_tokens=4))
    prompt = FIRST[:25] + [40, 41, 42]
    with torch.inference_mode():
        cache = kept.prefix_cache.take(kept.model, prompt, len(prompt) + room)
        assert cache.length == 25 and cache.max_len >= len(prompt) + room
        got = kept(torch.tensor([prompt[25:]]), cache=cache)[0, -1]
        expected = plain(torch.tensor([prompt]))[0, -1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_request_closed_early_keeps_what_it_ran(family):
    plain = tiny_model(family, context_length=200)
    kept = keeping(plain)
    steps = kept.decode_steps([FIRST], GenerationConfig(max_new_tokens=20))
    head = [next(steps)[0] for _ in range(5)]
    steps.close()  # a client that went away
    prompt = FIRST + head
    cfg = GenerationConfig(max_new_tokens=6)
    assert kept.generate([prompt], cfg) == generate(plain, [prompt], cfg)
    assert kept.prefix_cache.reused_tokens == len(FIRST) + 4


def test_short_prompts_several_prompts_and_other_paths_keep_nothing(family):
    plain = tiny_model(family, context_length=40)
    kept = keeping(plain)
    cfg = GenerationConfig(max_new_tokens=5)
    kept.generate([FIRST[: MIN_REUSE - 6]], cfg)  # prompt and answer shorter than MIN_REUSE
    kept.generate([FIRST, FIRST[:20]], cfg)  # a batch
    kept.generate([FIRST], GenerationConfig(max_new_tokens=5, use_cache=False))
    kept.generate([FIRST], GenerationConfig(max_new_tokens=20))  # runs past the 40-token window
    assert len(kept.prefix_cache) == 0


def test_the_oldest_caches_go_first_within_the_byte_budget(family):
    plain = tiny_model(family, context_length=200)
    cfg = GenerationConfig(max_new_tokens=4)
    prompts = [[90 + i] + FIRST for i in range(3)]  # no shared prefix, each the same size
    probe = keeping(plain)
    probe.generate([prompts[0]], cfg)
    one = probe.prefix_cache.nbytes
    kept = keeping(plain, max_bytes=2 * one)
    for prompt in prompts:
        kept.generate([prompt], cfg)
    assert len(kept.prefix_cache) == 2 and kept.prefix_cache.nbytes <= 2 * one
    kept.generate([prompts[0]], cfg)  # the oldest was dropped: nothing to reuse
    assert kept.prefix_cache.reused_tokens == 0
    tight = keeping(plain, max_bytes=one - 1)
    tight.generate([prompts[0]], cfg)
    assert len(tight.prefix_cache) == 0  # a cache over the whole budget is not kept


def test_a_cache_is_never_shared_by_two_requests(family):
    plain = tiny_model(family, context_length=200)
    kept = keeping(plain)
    cfg = GenerationConfig(max_new_tokens=10)
    held = FIRST + kept.generate([FIRST], cfg)[0][:-1]  # what the kept cache holds
    first = kept.decode_steps([held + [7]], cfg)
    next(first)  # has taken the kept cache over
    assert kept.generate([held + [8]], cfg) == generate(plain, [held + [8]], cfg)  # starts afresh
    assert kept.prefix_cache.reused_tokens == len(held)
    assert [t[0] for t in first] == generate(plain, [held + [7]], cfg)[0][1:]


def test_changed_weights_drop_every_kept_cache(family):
    plain = tiny_model(family, context_length=200)
    kept = keeping(plain)
    cfg = GenerationConfig(max_new_tokens=8)
    kept.generate([FIRST], cfg)
    with torch.no_grad():
        for model in (plain, kept.model):
            model.blocks[0].attn.qkv.weight.mul_(1.5)  # keys and values are other ones now
    assert kept.generate([FIRST + [7]], cfg) == generate(plain, [FIRST + [7]], cfg)
    assert kept.prefix_cache.reused_tokens == 0


def test_kept_caches_hold_only_their_tokens(family):
    plain = tiny_model(family, context_length=200)
    kept = keeping(plain)
    kept.generate([FIRST], GenerationConfig(max_new_tokens=50))
    (entry,) = kept.prefix_cache._entries
    assert entry.cache.max_len == entry.cache.length == len(FIRST) + 49 == len(entry.tokens)
    with pytest.raises(ValueError, match="cannot hold"):
        entry.cache.resized(10)


def test_a_copy_of_the_decoder_starts_with_an_empty_store(family):
    plain = tiny_model(family, context_length=200)
    kept = keeping(plain, max_bytes=2**20)
    cfg = GenerationConfig(max_new_tokens=6)
    kept.generate([FIRST], cfg)
    twin = copy.deepcopy(kept)
    assert len(kept.prefix_cache) == 1 and len(twin.prefix_cache) == 0 and twin.prefix_cache.max_bytes == 2**20
    for decoder in (kept, twin):
        assert decoder.generate([FIRST + [7]], cfg) == generate(plain, [FIRST + [7]], cfg)
    assert twin.prefix_cache.reused_tokens == 0 and kept.prefix_cache.reused_tokens == len(FIRST)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    with pytest.raises(ValueError):
        PrefixCache(-1)


@needs_kernels(kernels, "decode-layer kernel")
@pytest.mark.usefixtures("one_torch_thread")
def test_speculative_decoding_starts_from_a_kept_cache():
    plain = tiny_gpt2(context_length=200)
    fast = make_fast(copy.deepcopy(plain), FastConfig())
    assert fast.draft is not None
    fast.prefix_cache = PrefixCache()
    conversation(plain, fast, GenerationConfig(max_new_tokens=20))
    assert fast.prefix_cache.reused_tokens > 2 * len(FIRST)
    assert fast.draft.counts["accepted"] > 0
    torch.testing.assert_close(fast.model.head_weight, plain.head_weight)
