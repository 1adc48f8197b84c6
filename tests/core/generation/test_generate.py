import pytest
import torch

from core.model.config import ModelConfig
from core.generation.generate import ContextLengthError, GenerationConfig, held_back, decode_steps, generate
from core.model import GPTModel
from core.generation.sampling import SamplingConfig, filter_logits, sample

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15, 16, 17, 18, 19, 20]]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    torch.manual_seed(0)
    extra = dict(n_kv_heads=2, hidden_dim=48) if request.param == "llama" else {}
    cfg = ModelConfig(family=request.param, vocab_size=97, context_length=24, emb_dim=32, n_layers=2, n_heads=4, **extra)
    return GPTModel(cfg).eval()


def test_cached_and_uncached_generation_give_the_same_tokens(model):
    # 30 new tokens on a 24-token context also exercises cropping to the window.
    for prompt in PROMPTS:
        cached = generate(model, [prompt], GenerationConfig(max_new_tokens=30))
        uncached = generate(model, [prompt], GenerationConfig(max_new_tokens=30, use_cache=False))
        assert cached == uncached


def test_batched_generation_equals_one_by_one(model):
    cfg = GenerationConfig(max_new_tokens=12)
    assert generate(model, PROMPTS, cfg) == [generate(model, [p], cfg)[0] for p in PROMPTS]


def test_batched_generation_past_the_context_window_equals_one_by_one(model):
    # 24-token context: every row outgrows it, the longest first.
    cfg = GenerationConfig(max_new_tokens=25)
    assert generate(model, PROMPTS, cfg) == [generate(model, [p], cfg)[0] for p in PROMPTS]


def test_zero_new_tokens_yields_nothing(model):
    assert list(decode_steps(model, PROMPTS, GenerationConfig(max_new_tokens=0))) == []
    assert generate(model, PROMPTS, GenerationConfig(max_new_tokens=0)) == [[], [], []]


def test_uncached_greedy_matches_the_books_loop(model):
    # The book's generate_text_simple: crop, forward, argmax, append.
    ids = torch.tensor([PROMPTS[0]])
    for _ in range(10):
        with torch.no_grad():
            logits = model(ids[:, -model.cfg.context_length:])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generate(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=10)) == [ids[0, 5:].tolist()]


def test_stop_token_ends_each_row_separately(model):
    first = generate(model, PROMPTS, GenerationConfig(max_new_tokens=8))
    stop = first[0][2]
    out = generate(model, PROMPTS, GenerationConfig(max_new_tokens=8, stop_token_ids=(stop,)))
    assert out[0] == first[0][: first[0].index(stop)]
    for row, full in zip(out[1:], first[1:]):
        assert row == (full[: full.index(stop)] if stop in full else full)


def test_seeded_sampling_is_reproducible(model):
    cfg = GenerationConfig(max_new_tokens=15, temperature=1.5, top_k=20, seed=7)
    a = generate(model, [PROMPTS[0]], cfg)
    assert a == generate(model, [PROMPTS[0]], cfg)
    assert a != generate(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=15, temperature=1.5, top_k=20, seed=8))


def test_prompt_longer_than_context_is_a_clear_error(model):
    with pytest.raises(ContextLengthError, match="context window is 24"):
        generate(model, [list(range(25))], GenerationConfig(max_new_tokens=1))
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], GenerationConfig(max_new_tokens=1))


def test_decode_steps_reports_finished_rows_as_none(model):
    steps = list(decode_steps(model, [[1, 2]], GenerationConfig(max_new_tokens=3)))
    assert len(steps) == 3 and all(isinstance(s[0], int) for s in steps)


def test_top_k_keeps_k_tokens_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = filter_logits(logits, SamplingConfig(temperature=1.0, top_k=2)).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    kept = filter_logits(logits, SamplingConfig(temperature=1.0, top_p=0.8)).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]]
    assert probs[0] < 0.8 < probs[0] + probs[1]
    kept = filter_logits(logits, SamplingConfig(temperature=1.0, top_p=0.5)).isfinite()
    assert kept.tolist() == [[True, False, False, False, False]]


def test_top_p_after_top_k_is_the_nucleus_of_the_top_k_tokens():
    # filter_logits sorts only the tokens top-k left in the running; a full sort gives the same set.
    torch.manual_seed(0)
    logits = torch.randn(4, 300)
    logits[1, :5] = 10.0  # five tied leaders: top_k=3 keeps all five
    for cfg in (SamplingConfig(temperature=0.9, top_k=3, top_p=0.9), SamplingConfig(temperature=1.3, top_k=40, top_p=0.7),
                SamplingConfig(temperature=1.0, top_k=299, top_p=0.5)):
        scaled = logits / cfg.temperature
        kth = scaled.topk(cfg.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs, order = scaled.softmax(-1).sort(dim=-1, descending=True)
        keep_sorted = (probs.cumsum(-1) - probs) < cfg.top_p
        keep_sorted[:, 0] = True
        expected = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        assert torch.equal(filter_logits(logits, cfg).isfinite(), expected)
    assert filter_logits(logits, SamplingConfig(temperature=1.0, top_k=3, top_p=0.9))[1].isfinite().sum() == 5


def test_sampling_respects_filters_and_greedy_is_argmax():
    logits = torch.tensor([[0.0, 5.0, 4.9, -2.0]])
    assert sample(logits, SamplingConfig()).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingConfig(temperature=2.0, top_k=2), g).item() for _ in range(200)}
    assert draws == {1, 2}
    with pytest.raises(ValueError):
        SamplingConfig(top_p=1.5)


def testheld_back_text_is_a_possible_stop_prefix():
    assert held_back("hello ###", ("### Instruction:",)) == 3
    assert held_back("hello", ("### Instruction:",)) == 0
    assert held_back("ab<|im", ("<|im_end|>",)) == 4
