"""core.fast.cuda_graphs: the static decoding step a CUDA graph records gives the ordinary step's tokens and logits.

On the CPU the static step runs eagerly (``capture=False``): that checks
everything a graph replays except the recording itself, which the CUDA tests
at the end check where a GPU is present.
"""

import threading

import pytest
import torch

from core.fast.cuda_graphs import MAX_GRAPHS, MIN_LENGTH, GraphedDecoder, StaticStep, cache_length
from core.fast.serving import ServingDecoder
from core.fast.transforms import FastConfig, make_fast
from core.generation.generate import GenerationConfig, generate
from core.model.kv_cache import KVCache
from core.model import GPTModel
from fused_models import tiny_model as tiny

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15, 16, 17, 18, 19, 20]]


def with_graphs(model: GPTModel, capture: bool = False) -> ServingDecoder:
    decoder = ServingDecoder(model)
    decoder.graphs = GraphedDecoder(model, decoder.logits, capture=capture)
    return decoder


@pytest.fixture(params=["gpt2", "llama"])
def family(request):
    return request.param


def test_static_steps_give_the_plain_models_greedy_tokens(family):
    plain, static = tiny(family), with_graphs(tiny(family))
    cfg = GenerationConfig(max_new_tokens=20)
    for prompts in ([PROMPTS[0]], [PROMPTS[1]], PROMPTS):  # one row, and left-padded rows
        assert static.generate(prompts, cfg) == generate(plain, prompts, cfg)
    assert len(static.graphs) == 2  # batch 1 and batch 3, one cache length


def test_static_steps_give_the_plain_models_sampled_tokens(family):
    plain, static = tiny(family), with_graphs(tiny(family))
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.5, top_k=20, top_p=0.9, seed=7)
    assert static.generate(PROMPTS, cfg) == generate(plain, PROMPTS, cfg)


def assert_steps_match(model: GPTModel, decoder: GraphedDecoder, tol: float = 1e-5) -> None:
    """The static step's logits, token by token, against the ordinary step's, for a row with padding."""
    device = model.head_weight.device
    seq = torch.tensor([[3, 0, 0, 4, 5, 6, 7, 8, 9, 10, 11, 12]], device=device)  # its 2nd and 3rd tokens padding
    real = torch.ones_like(seq)
    real[0, 1:3] = 0
    L = 4
    ordinary = KVCache(model.cfg, 1, seq.shape[1], device, model.head_weight.dtype)
    with torch.inference_mode(), decoder.session(1, seq.shape[1]) as step:
        step.begin(real[:, :L])
        expected = model(seq[:, :L], cache=ordinary, attention_mask=real[:, :L])
        got = model(seq[:, :L], cache=step.cache, attention_mask=real[:, :L])
        torch.testing.assert_close(got, expected)
        for n in range(L, seq.shape[1]):
            expected = model(seq[:, n:n + 1], cache=ordinary, attention_mask=real[:, :n + 1])
            torch.testing.assert_close(step.step(seq[:, n]), expected, rtol=tol, atol=tol)
        assert step.cache.length == ordinary.length == seq.shape[1]
        step.cache.length = step.cache.max_len
        with pytest.raises(ValueError, match="overflow"):
            step.step(seq[:, 0])


def test_static_step_logits_match_the_ordinary_step(family):
    model = tiny(family)
    assert_steps_match(model, GraphedDecoder(model, capture=False))


def test_cache_lengths_are_powers_of_two_within_the_context():
    assert cache_length(1, 1024) == MIN_LENGTH
    assert cache_length(MIN_LENGTH, 1024) == MIN_LENGTH
    assert cache_length(MIN_LENGTH + 1, 1024) == 2 * MIN_LENGTH
    assert cache_length(700, 1024) == 1024
    assert cache_length(700, 800) == 800
    assert cache_length(10, 40) == 40


def test_requests_reuse_a_step_per_batch_and_length_and_the_oldest_goes(family):
    decoder = with_graphs(tiny(family, context_length=2 * MIN_LENGTH + 10))
    plain = tiny(family, context_length=2 * MIN_LENGTH + 10)
    short, long = GenerationConfig(max_new_tokens=5), GenerationConfig(max_new_tokens=MIN_LENGTH)
    for cfg in (short, short, long):  # the long request needs the next length up
        assert decoder.generate([PROMPTS[0]], cfg) == generate(plain, [PROMPTS[0]], cfg)
    assert sorted(decoder.graphs._steps) == [(1, MIN_LENGTH), (1, 2 * MIN_LENGTH)]
    for batch in range(2, MAX_GRAPHS + 2):
        decoder.generate([PROMPTS[0]] * batch, short)
    assert len(decoder.graphs) == MAX_GRAPHS
    assert (1, MIN_LENGTH) not in decoder.graphs._steps


def test_past_the_context_window_decoding_is_the_ordinary_loop(family):
    plain, static = tiny(family, context_length=24), with_graphs(tiny(family, context_length=24))
    cfg = GenerationConfig(max_new_tokens=30)  # outgrows the 24-token window
    assert static.generate(PROMPTS, cfg) == generate(plain, PROMPTS, cfg)
    assert len(static.graphs) == 0


def test_a_second_request_meanwhile_decodes_with_its_own_cache(family):
    plain, static = tiny(family), with_graphs(tiny(family))
    cfg = GenerationConfig(max_new_tokens=12)
    expected = [generate(plain, [p], cfg)[0] for p in PROMPTS[:2]]
    first = static.decode_steps([PROMPTS[0]], cfg)
    head = [next(first)[0] for _ in range(4)]  # holds the static step
    other = []
    thread = threading.Thread(target=lambda: other.append(static.generate([PROMPTS[1]], cfg)[0]))
    thread.start()
    thread.join()
    rest = [t[0] for t in first]
    assert other == [expected[1]]
    assert head + rest == expected[0]
    assert static.generate([PROMPTS[1]], cfg) == [expected[1]]  # released when the first one ended


def test_a_step_that_cannot_be_recorded_leaves_decoding_to_the_ordinary_loop(family, monkeypatch, caplog):
    def refuse(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticStep, "_capture", refuse)
    plain, static = tiny(family), with_graphs(tiny(family), capture=True)
    cfg = GenerationConfig(max_new_tokens=12)
    for _ in range(2):
        assert static.generate(PROMPTS, cfg) == generate(plain, PROMPTS, cfg)
    assert "not permitted" in static.graphs.failed
    assert len(static.graphs) == 0
    assert sum("cannot be recorded" in r.message for r in caplog.records) == 1  # said once, not per request


def test_a_copy_of_the_decoder_records_its_own_steps(family):
    import copy

    static = with_graphs(tiny(family))
    cfg = GenerationConfig(max_new_tokens=8)
    expected = static.generate([PROMPTS[0]], cfg)
    twin = copy.deepcopy(static)
    assert twin.graphs.model is twin.model and len(twin.graphs) == 0
    assert twin.generate([PROMPTS[0]], cfg) == expected
    assert next(iter(twin.graphs._steps.values())).model is twin.model


def test_make_fast_installs_graphs_only_on_cuda():
    decoder = make_fast(tiny("gpt2"), FastConfig())
    assert decoder.graphs is None
    assert "cuda_graphs" not in str(decoder.report)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recorded_steps_match_the_ordinary_step_on_cuda(family, dtype):
    model = tiny(family, device="cuda").to(dtype)
    decoder = GraphedDecoder(model)
    assert decoder.capture
    assert_steps_match(model, decoder, tol=1e-5 if dtype == torch.float32 else 2e-2)
    assert next(iter(decoder._steps.values())).graph is not None


@cuda
def test_recorded_graphs_give_the_eager_tokens_on_cuda(family):
    plain = tiny(family, context_length=300, device="cuda")
    fast = make_fast(tiny(family, context_length=300, device="cuda"), FastConfig())
    assert "cuda_graphs" in fast.report.applied[-1]
    for prompts, cfg in (
        ([PROMPTS[0]], GenerationConfig(max_new_tokens=40)),
        (PROMPTS, GenerationConfig(max_new_tokens=40)),
        (PROMPTS, GenerationConfig(max_new_tokens=40, temperature=1.0, top_k=20, seed=3)),
        ([PROMPTS[2]], GenerationConfig(max_new_tokens=MIN_LENGTH)),  # the next cache length up
    ):
        assert fast.generate(prompts, cfg) == generate(plain, prompts, cfg)
    assert len(fast.graphs) == 3
    assert all(step.graph is not None for step in fast.graphs._steps.values())
