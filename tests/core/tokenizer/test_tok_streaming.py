"""StreamDecoder: only whole characters come out, and all of them in the end."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.tokenizer import StreamDecoder, gpt2_tokenizer

IMPLS = ["tiktoken", "bpe"]


@pytest.mark.parametrize("impl", IMPLS)
def test_emoji_split_across_tokens(impl):
    tok = gpt2_tokenizer(impl)
    ids = tok.encode("😀")
    assert ids == [47249, 222]  # b"\xf0\x9f\x98" + b"\x80"
    dec = StreamDecoder(tok)
    assert dec.push(ids[0]) == ""  # three bytes of four: nothing yet, never half a character
    assert dec.pending == b"\xf0\x9f\x98"
    assert dec.push(ids[1]) == "😀"
    assert dec.pending == b"" and dec.flush() == ""


@pytest.mark.parametrize("impl", IMPLS)
def test_cjk_and_mixed_text(impl):
    tok = gpt2_tokenizer(impl)
    text = "日本語のテキスト 👨‍👩‍👧 café\n"
    dec = StreamDecoder(tok)
    outputs = [dec.push(i) for i in tok.encode(text)]
    assert "".join(outputs) + dec.flush() == text
    assert all("\ufffd" not in out for out in outputs)
    assert "" in outputs  # some token did end inside a character


def test_flush_replaces_an_unfinished_character():
    tok = gpt2_tokenizer("bpe")
    dec = StreamDecoder(tok)
    assert dec.push(tok.encode("a😀")[0]) == "a"
    assert dec.push(47249) == ""
    assert dec.flush() == "\ufffd"
    assert dec.push(tok.encode("b")[0]) == "b"  # usable again after flush


def test_invalid_bytes_do_not_stall_the_stream():
    tok = gpt2_tokenizer("bpe")
    dec = StreamDecoder(tok)
    lone_continuation = tok.encode("😀")[1]  # b"\x80" alone can never start a character
    assert dec.push(lone_continuation) == "\ufffd"
    assert dec.push(tok.encode("ok")[0]) == "ok"


def test_push_many_equals_pushes():
    tok = gpt2_tokenizer("tiktoken")
    ids = tok.encode("🇫🇷 and 🫠!")
    one = StreamDecoder(tok)
    many = StreamDecoder(tok)
    assert "".join(one.push(i) for i in ids) == many.push_many(ids[:3]) + many.push_many(ids[3:])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=50256), max_size=40))
def test_stream_equals_decode_for_any_ids(ids):
    tok = gpt2_tokenizer("bpe")
    dec = StreamDecoder(tok)
    streamed = "".join(dec.push(i) for i in ids) + dec.flush()
    assert streamed == tok.decode(ids)
