"""core.fast.speculative: decoding with a low-precision draft of the model's own weights gives the plain
model's greedy tokens, and sampled tokens with the plain model's distribution, whatever the draft guesses."""

import copy

import pytest
import torch

from core.model.config import ModelConfig
from core.fast.fused_layers import kernels
from core.fast.screened_head import ScreenedHead
from core.fast.serving import ServingDecoder
from core.fast.transforms import FastConfig, fast_for_serving, make_fast
from core.generation.generate import GenerationConfig, generate
from core.model import GPTModel
from core.serving import Engine
from core.tokenizer import gpt2_tokenizer
from core.weights.checkpoint import Checkpoint
from core.generation.sampling import next_token_probabilities
from core.fast.speculative import MAX_DRAFT, MIN_JUDGED, SelfDraft
from fused_models import tiny_gpt2
from kernel_marks import needs_kernels

pytestmark = [needs_kernels(kernels, "decode-layer kernel"), pytest.mark.usefixtures("one_torch_thread")]


def tiny(**kw) -> GPTModel:
    return tiny_gpt2(**{"context_length": 48, **kw})  # the window the length tests run up to


def drafted(model: GPTModel, cfg: FastConfig | None = None) -> ServingDecoder:
    fast = make_fast(copy.deepcopy(model), cfg)
    assert any(a.startswith("speculative (one sequence: int8 drafts of up to 7 tokens") for a in fast.report.applied)
    return fast


PROMPTS = [[5, 6, 7, 8, 9], [11], [13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [400, 3, 400, 3]]


def test_the_tokens_are_the_plain_models_in_fewer_passes():
    model = tiny()
    fast = drafted(model)
    cfg = GenerationConfig(max_new_tokens=30)
    for prompt in PROMPTS:
        assert fast.generate([prompt], cfg) == generate(model, [prompt], cfg)
    counts = fast.draft.counts
    assert counts["accepted"] > 0.8 * counts["drafted"]  # int8 guesses the tiny model's tokens well
    assert counts["passes"] < 0.3 * 30 * len(PROMPTS)  # about one fp32 pass per eight tokens, not one per token
    bf16 = drafted(model)
    # The bf16 draft shares the screened output layer's bf16 copy, as make_fast's int8 one would.
    screen = bf16.argmax_head.panels if isinstance(bf16.argmax_head, ScreenedHead) else None
    bf16.draft = SelfDraft(bf16.model, torch.bfloat16, head_screen=screen)
    assert bf16.generate([PROMPTS[0]], cfg) == generate(model, [PROMPTS[0]], cfg)
    assert bf16.draft.counts["accepted"] > 0


class Oracle:
    """A draft that knows the plain model's tokens and gets every ``every``-th guess wrong: each
    pass then keeps a few guesses and rejects the rest, which exercises the cache's rollback."""

    def __init__(self, draft: SelfDraft, sequence: list[int], every: int) -> None:
        self.draft, self.sequence, self.every, self.guesses = draft, sequence, every, 0

    def __getattr__(self, name):
        return getattr(self.draft, name)

    def scores(self, model, token, position, cache):
        scores = self.draft.scores(model, token, position, cache)  # its keys and values go into the cache
        self.guesses += 1
        right = self.sequence[position + 1]
        guess = right if self.guesses % self.every else (right + 1) % model.cfg.vocab_size
        return torch.nn.functional.one_hot(torch.tensor(guess), len(scores)).float()


@pytest.mark.parametrize("every", [2, 3, 5, 8])
def test_rejected_guesses_leave_no_trace(every):
    model = tiny()
    fast = drafted(model)
    prompt, cfg = PROMPTS[0], GenerationConfig(max_new_tokens=40)
    plain = generate(model, [prompt], cfg)[0]
    fast.draft = Oracle(fast.draft, prompt + plain, every)
    assert fast.generate([prompt], cfg)[0] == plain
    counts = fast.draft.counts
    assert 0 < counts["accepted"] < counts["drafted"]


def test_a_draft_that_is_always_wrong_changes_nothing_and_is_given_up():
    model = tiny()
    fast = drafted(model)
    fast.draft.scores = lambda model, token, position, cache: torch.nn.functional.one_hot(
        torch.tensor((token + 1) % 500), 500).float()
    prompt, cfg = PROMPTS[2], GenerationConfig(max_new_tokens=35)
    assert fast.generate([prompt], cfg) == generate(model, [prompt], cfg)
    counts = fast.draft.counts
    assert counts["accepted"] == 0
    # Judged after MIN_JUDGED guesses, then one token per pass.
    assert MIN_JUDGED <= counts["drafted"] < MIN_JUDGED + MAX_DRAFT


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 7, 8, 9, 17, 43])
def test_every_length_and_stop_token(max_new_tokens):
    model = tiny()
    fast = drafted(model)
    prompt = PROMPTS[0]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    plain = generate(model, [prompt], cfg)
    assert fast.generate([prompt], cfg) == plain and len(plain[0]) == max_new_tokens
    if max_new_tokens > 3:
        # A stop token inside an accepted draft: nothing after it comes out.
        stop = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=(plain[0][3],))
        assert fast.generate([prompt], stop) == generate(model, [prompt], stop)


def test_what_the_draft_does_not_take_decodes_token_by_token():
    model = tiny()
    fast = drafted(model)
    counts = fast.draft.counts
    cases = [
        ([PROMPTS[0], PROMPTS[1]], GenerationConfig(max_new_tokens=10)),  # two sequences
        ([PROMPTS[0]], GenerationConfig(max_new_tokens=10, use_cache=False)),
        ([PROMPTS[0]], GenerationConfig(max_new_tokens=45)),  # past the 48-token window
    ]
    for prompts, cfg in cases:
        assert fast.generate(prompts, cfg) == generate(model, prompts, cfg)
    assert counts == {"passes": 0, "drafted": 0, "accepted": 0}


class Flipped:
    """A draft whose distribution is far from the model's: its logits in reverse vocabulary order."""

    def __init__(self, draft: SelfDraft) -> None:
        self.draft = draft

    def __getattr__(self, name):
        return getattr(self.draft, name)

    def scores(self, model, token, position, cache):
        return self.draft.scores(model, token, position, cache).flip(0)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.8, top_k=5, top_p=0.9)])
def test_sampled_tokens_are_distributed_as_the_models_own(sampling):
    # Leviathan et al.'s rule makes each token follow the model's distribution whatever the draft's.
    # Three new tokens: the first from the prompt's pass, the second a drafted guess kept or
    # replaced by a draw from max(0, p - q), the third the pass's own draw after a kept guess.
    model = tiny(vocab_size=8, head_scale=1.0)
    fast = drafted(model)
    fast.draft = Flipped(fast.draft)
    prompt, runs = [1, 2, 3], 3000
    counts = torch.zeros(3, 8)
    for seed in range(runs):
        out = fast.generate([prompt], GenerationConfig(max_new_tokens=3, seed=seed, **sampling))[0]
        counts[torch.arange(3), torch.tensor(out)] += 1
    # The exact distributions of the three tokens, from the plain model over every two-token prefix.
    cfg = GenerationConfig(max_new_tokens=3, **sampling)
    prefixes = torch.tensor([prompt + [a, b] for a in range(8) for b in range(8)])
    with torch.inference_mode():
        logits = model(prefixes)
    first = next_token_probabilities(logits[:1, 2], cfg)[0]  # (8,)
    second = next_token_probabilities(logits[::8, 3], cfg)  # (8 first tokens, 8)
    third = next_token_probabilities(logits[:, 4], cfg).view(8, 8, 8)  # (first, second, third)
    exact = torch.stack([first, first @ second, torch.einsum("a,ab,abc->c", first, second, third)])
    distance = 0.5 * (counts / runs - exact).abs().sum(-1)  # total variation, per token
    assert (distance < 0.05).all(), distance  # sampling noise at 3,000 runs: about 0.02
    assert 0 < fast.draft.counts["accepted"] < fast.draft.counts["drafted"]  # guesses kept and refused
    # The same seed, the same draws.
    again = GenerationConfig(max_new_tokens=12, seed=7, **sampling)
    assert fast.generate([prompt], again) == fast.generate([prompt], again)


def test_which_models_get_a_draft():
    assert ServingDecoder(tiny()).draft is None  # the plain model decodes token by token
    off = make_fast(copy.deepcopy(tiny()), FastConfig(speculative=False))
    assert off.draft is None
    for model, cfg in ((tiny().bfloat16(), None), (tiny(), FastConfig(panels=False))):
        assert make_fast(model, cfg).draft is None
    report = make_fast(tiny(), FastConfig(fused_layers=False)).report
    assert "has none" in report.skipped["speculative"]
    llama = GPTModel(ModelConfig(family="llama", vocab_size=500, context_length=40, emb_dim=48, n_layers=2,
                                 n_heads=4, n_kv_heads=2, hidden_dim=96)).eval()
    assert "speculative" not in str(make_fast(llama).report)
    with pytest.raises(ValueError, match="fused GPT-2 layers"):
        SelfDraft(tiny())
    with pytest.raises(ValueError, match="max_draft"):
        SelfDraft(drafted(tiny()).model, max_draft=8)


def test_the_draft_follows_changed_weights_and_copies():
    model = tiny()
    fast = drafted(model)
    cfg = GenerationConfig(max_new_tokens=20)
    fast.generate([PROMPTS[0]], cfg)  # builds the draft's int8 copies
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    fast.model.load_state_dict(model.state_dict())  # e.g. a fine-tuned checkpoint loaded into the served model
    assert fast.generate([PROMPTS[0]], cfg) == generate(model, [PROMPTS[0]], cfg)
    assert fast.draft.counts["accepted"] > 0.8 * fast.draft.counts["drafted"]  # the copies were rebuilt
    twin = copy.deepcopy(fast)
    assert twin.generate([PROMPTS[3]], cfg) == generate(model, [PROMPTS[3]], cfg) and twin.draft.counts["accepted"] > 0


def test_the_engines_decoder_keeps_the_draft_and_a_lone_sequence_there_speculates(tmp_path):
    model = tiny()
    checkpoint = Checkpoint(tmp_path, model.cfg, copy.deepcopy(model), gpt2_tokenizer())
    fast = fast_for_serving(checkpoint)  # as the service builds it for its engine
    assert fast.draft is not None
    engine = Engine(fast, checkpoint.tokenizer)
    cfg = GenerationConfig(max_new_tokens=30)
    handle = engine.submit(PROMPTS[2], cfg)
    while engine.step():
        pass
    assert [t for chunk in handle for t in chunk.token_ids] == generate(model, [PROMPTS[2]], cfg)[0]
    counts = fast.draft.counts
    assert counts["accepted"] > 0.8 * counts["drafted"] > 0
    assert engine.stats.steps == counts["passes"] < 30  # several tokens an engine step
