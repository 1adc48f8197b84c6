"""Property tests: on any text both GPT-2 backends agree with tiktoken and round-trip."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from core.tokenizer import gpt2_tokenizer

# Every code point but surrogates, control characters included; plus text made of
# the pieces the pre-tokenizer cares about, so whitespace runs and contractions recur.
any_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)
fragments = st.sampled_from(["'s", "'ll", "'t", " ", "  ", "\n", "\t", "\r\n", "1", "23", " 4", "a", "É", "ab",
                             "日本", "😀", "\u200b", "\xa0", "!", "?!", "\x00", "\x1c", "¹", "Ⅻ", "٣", "\u0558"])
piecewise_text = st.lists(fragments, max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(any_text, piecewise_text))
@example("")
@example("\x00\x01\x02\x1f\x7f")
@example("   \n\n  x")
def test_both_impls_agree_with_tiktoken_and_round_trip(reference_gpt2, text):
    expected = reference_gpt2.encode(text)
    for impl in ("tiktoken", "bpe"):
        tok = gpt2_tokenizer(impl)
        ids = tok.encode(text)
        assert ids == expected, impl
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")


surrogates = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff", "\ud83d", "\ude00"])
text_with_surrogates = st.text(alphabet=st.characters(exclude_categories=()) | surrogates, max_size=60)


@settings(max_examples=150, deadline=None)
@given(text_with_surrogates)
def test_surrogate_text_agrees_with_tiktoken(reference_gpt2, text):
    """Lone and paired surrogates: both impls repair them exactly as tiktoken does."""
    expected = reference_gpt2.encode(text)
    assert gpt2_tokenizer("bpe").encode(text) == expected
    assert gpt2_tokenizer("tiktoken").encode(text) == expected
