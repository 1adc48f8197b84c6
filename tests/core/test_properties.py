"""Property tests of generation (hypothesis): any prompt text either generates or fails with a clear error.

The tokenizer's own properties (round trips, tiktoken parity, surrogates) are in
tests/core/tokenizer/test_tok_properties.py and test_tok_streaming.py; these start where they
stop: random Unicode (control characters, surrogates, empty text) through the tokenizer into
the one generation loop, streamed with and without stop strings, sampled with any valid
settings, and prompts far past the context window. Tiny random models keep each example
at a few milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from core.generation.chat_template import ALPACA, CHATML
from core.model.config import ModelConfig
from core.generation.generate import ContextLengthError, GenerationConfig, generate, stream
from core.model import GPTModel
from core.generation.sampling import SamplingConfig
from core.tokenizer import gpt2_tokenizer
from core.tokenizer.errors import DisallowedSpecialToken
from core.tokenizer.specials import repair_surrogates

CONTEXT = 32
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Any code point, surrogates and control characters included, or text built from the pieces
# that make tokenizers and templates work hard.
any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=80)
pieces = st.sampled_from(["\x00", "\x1b[31m", "\r\n", "\t", "\u200b", "\ufeff", "\ud800", "\udfff", "😀", "é", "e\u0301",
                          "<|endoftext|>", "<|im_end|>", "### Response:", "{{ 7*7 }}", "{% raw %}", " ", "a", "日本"])
tricky_text = st.one_of(any_text, st.lists(pieces, max_size=30).map("".join))


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel(ModelConfig(vocab_size=50257, context_length=CONTEXT, emb_dim=16, n_layers=1, n_heads=2)).eval()


def streamed(model, tok, ids, cfg) -> tuple[str, list[int], list[str | None]]:
    chunks = list(stream(model, tok, ids, cfg))
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], [c.finish_reason for c in chunks]


@SETTINGS
@given(text=tricky_text, max_new=st.integers(0, 4))
@example(text="", max_new=4)
@example(text="\x00\x01\x02\x7f", max_new=4)
@example(text="word " * 200, max_new=4)
def test_any_prompt_text_generates_or_fails_clearly(model, tok, text, max_new):
    ids = tok.encode(text, allowed_special="all")  # a prompt may hold "<|endoftext|>" on purpose
    cfg = GenerationConfig(max_new_tokens=max_new)
    if not ids:
        with pytest.raises(ValueError, match="prompt is empty"):
            streamed(model, tok, ids, cfg)
        return
    if len(ids) > CONTEXT:
        with pytest.raises(ContextLengthError, match=rf"{len(ids)} tokens.*context window is {CONTEXT}.*shorten"):
            streamed(model, tok, ids, cfg)
        return
    text_out, new_ids, reasons = streamed(model, tok, ids, cfg)
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert len(new_ids) == max_new
    # Streamed text is exactly the decoded tokens: no character split, dropped or doubled.
    assert text_out == tok.decode(new_ids)
    assert new_ids == generate(model, [ids], cfg)[0]


def unstopped(model, tok, ids, max_new: int) -> str:
    return tok.decode(generate(model, [ids], GenerationConfig(max_new_tokens=max_new))[0])


@settings(SETTINGS, max_examples=60)
@given(data=st.data(), text=tricky_text)
def test_a_stop_string_cuts_the_text_where_it_first_occurs(model, tok, data, text):
    ids = tok.encode(text, allowed_special="all")[-CONTEXT:] or [tok.eos_id]
    full = unstopped(model, tok, ids, 8)
    # A stop taken from what the model writes (so it occurs), or any short text (so it may not).
    inside = st.integers(0, max(len(full) - 1, 0)).flatmap(
        lambda i: st.integers(i + 1, len(full) + 1).map(lambda j: full[i:j]))
    stop = data.draw(st.one_of(inside, st.text(min_size=1, max_size=3)))
    assume(stop)
    text_out, _, reasons = streamed(model, tok, ids, GenerationConfig(max_new_tokens=8, stop_strings=(stop,)))
    assert text_out == (full[: full.find(stop)] if stop in full else full), (stop, full)
    assert stop not in text_out
    assert reasons[-1] == ("stop" if stop in full else "length")


def test_a_stop_string_completed_by_the_last_bytes_is_a_stop(model, tok):
    """This prompt's 8 tokens end in bytes of an unfinished character, decoded as U+FFFD only
    when the stream flushes: a stop string ending there still cuts the answer as a stop."""
    ids = [28826, 46178]
    full = unstopped(model, tok, ids, 8)
    assert full.endswith("\ufffd")
    # The shortest ending of the answer found nowhere earlier in it.
    stop = next(full[-k:] for k in range(1, len(full) + 1) if full.find(full[-k:]) == len(full) - k)
    text_out, _, reasons = streamed(model, tok, ids, GenerationConfig(max_new_tokens=8, stop_strings=(stop,)))
    assert text_out == full[: len(full) - len(stop)]
    assert reasons[-1] == "stop"


def test_several_stop_strings_cut_at_the_earliest(model, tok):
    ids = tok.encode("The lighthouse keeper said")
    first_token = unstopped(model, tok, ids, 1)  # " Digest" for this model
    assert len(first_token) >= 2 and first_token[-1] not in first_token[:-1]
    # Both stops arrive with the first token; the one listed first occurs later in the text.
    stops = (first_token[-1], first_token[0])
    text_out, _, reasons = streamed(model, tok, ids, GenerationConfig(max_new_tokens=8, stop_strings=stops))
    assert reasons[-1] == "stop"
    assert text_out == ""  # the first character is a stop string


@settings(SETTINGS, max_examples=50)
@given(
    text=tricky_text,
    temperature=st.floats(0.0, 2.0),
    top_k=st.none() | st.integers(1, 60000),
    top_p=st.none() | st.floats(1e-6, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_valid_sampling_settings_stream_what_generate_returns(model, tok, text, temperature, top_k, top_p, seed):
    ids = tok.encode(text, allowed_special="all")[-CONTEXT:] or [tok.eos_id]
    cfg = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, max_new_tokens=3)
    text_out, new_ids, _ = streamed(model, tok, ids, cfg)
    assert new_ids == generate(model, [ids], cfg)[0]  # same seed, same tokens, streamed or not
    assert text_out == tok.decode(new_ids)
    assert all(0 <= t < 50257 for t in new_ids)


_SMALL_MODELS: dict[str, GPTModel] = {}


def small_model(family: str) -> GPTModel:
    if family not in _SMALL_MODELS:
        torch.manual_seed(1)
        extra = dict(n_kv_heads=1, hidden_dim=24) if family == "llama" else {}
        _SMALL_MODELS[family] = GPTModel(ModelConfig(family=family, vocab_size=61, context_length=CONTEXT, emb_dim=16,
                                                     n_layers=1, n_heads=2, **extra)).eval()
    return _SMALL_MODELS[family]


@settings(max_examples=25, deadline=None)
@given(prompt_len=st.integers(1, CONTEXT), max_new=st.integers(CONTEXT, 2 * CONTEXT), family=st.sampled_from(["gpt2", "llama"]))
def test_answers_longer_than_the_context_window_slide_on(prompt_len, max_new, family):
    """Past the window the model sees the last CONTEXT tokens, cached or not; it never crashes."""
    m = small_model(family)
    prompt = [(7 * i) % 61 for i in range(prompt_len)]
    cached = generate(m, [prompt], GenerationConfig(max_new_tokens=max_new))[0]
    uncached = generate(m, [prompt], GenerationConfig(max_new_tokens=max_new, use_cache=False))[0]
    assert len(cached) == max_new
    assert cached == uncached


@SETTINGS
@given(text=tricky_text, template=st.sampled_from([ALPACA, CHATML]))
def test_chat_templates_keep_any_text_verbatim(tok, text, template):
    """A message is data to the template: rendered as is, never evaluated ("{{ 7*7 }}" stays text)."""
    rendered = template.render([{"role": "system", "content": "sys"}, {"role": "user", "content": text}])
    assert text in rendered
    assert ("{{ 7*7 }}" not in text) or ("{{ 7*7 }}" in rendered)
    if "<|endoftext|>" in rendered:
        # A special-token string typed by a user is refused unless the caller allows it, by name.
        with pytest.raises(DisallowedSpecialToken, match="allowed_special"):
            tok.encode(rendered)
    else:
        assert tok.decode(tok.encode(rendered)) == repair_surrogates(rendered)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
    ],
)
def test_invalid_settings_are_refused_up_front(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


@pytest.mark.parametrize("temperature", [math.nan])
def test_nan_temperature_is_refused_up_front(temperature):
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=temperature)
