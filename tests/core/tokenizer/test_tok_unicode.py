"""Unicode classes: our pre-tokenizer's \\p{L}/\\p{N} are tiktoken's, code point for code point."""

from __future__ import annotations

import pytest
import regex
import tiktoken

from core.tokenizer import gpt2_tokenizer
from core.tokenizer.pretokenizer import PreTokenizer
from core.tokenizer.unicode_classes import LETTER_RANGES, NUMBER_RANGES, drift_guard, pin_unicode_classes

EVERY_CHAR = "".join(map(chr, range(0xD800))) + "".join(map(chr, range(0xE000, 0x110000)))
BYTE_RANKS = {bytes((b,)): b for b in range(256)}


def tiktoken_class(pattern: str) -> set[int]:
    """The code points tiktoken's regex puts in ``pattern``: text it does not match is dropped."""
    probe = tiktoken.Encoding(f"probe{pattern}", pat_str=pattern, mergeable_ranks=BYTE_RANKS, special_tokens={})
    return {ord(c) for c in bytes(probe.encode_ordinary(EVERY_CHAR)).decode("utf-8")}


def as_set(ranges: tuple[tuple[int, int], ...]) -> set[int]:
    return {c for first, last in ranges for c in range(first, last + 1)}


def test_pinned_tables_equal_tiktokens_unicode():
    """If this fails, tiktoken moved to another Unicode version: regenerate unicode_classes.py."""
    assert as_set(LETTER_RANGES) == tiktoken_class(r"\p{L}")
    assert as_set(NUMBER_RANGES) == tiktoken_class(r"\p{N}")
    # \s is White_Space in both engines (the stdlib `re` would add \x1c-\x1f).
    assert {ord(c) for c in regex.findall(r"\s", EVERY_CHAR)} == tiktoken_class(r"\s")


def test_pin_unicode_classes_rewrites_only_l_and_n():
    pinned = pin_unicode_classes(r"a\p{L}+[^\s\p{N}]\p{Lu}\\p{L}")
    compiled = regex.compile(pinned)
    assert r"\p{Lu}" in pinned and r"\\p{L}" in pinned  # other properties and escaped backslashes stay
    assert compiled.fullmatch("aé!Q\\p{L}")
    assert not compiled.fullmatch("aé5Q\\p{L}")  # 5 is a number, excluded from the class
    assert pin_unicode_classes(r"[]\p{L}]") == r"[]" + pin_unicode_classes(r"\p{L}")[1:-1] + "]"


def test_drifted_characters_split_like_tiktoken(reference_gpt2):
    """U+0558 is a letter for the `regex` module but unassigned for tiktoken's Unicode 16."""
    guard = drift_guard()
    if guard is None or not guard.search("\u0558"):
        pytest.skip("the installed regex module does not know U+0558 either")
    pre = PreTokenizer(r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""")
    assert pre.has_drifted("x\u0558") and not pre.has_drifted("plain ascii") and not pre.has_drifted("日本")
    assert pre.split_fast("\u0558'll") == ["\u0558", "'ll"]  # the regex module's own view
    assert pre.split("\u0558'll") == ["\u0558'", "ll"]  # tiktoken's view
    for impl in ("bpe", "tiktoken"):
        tok = gpt2_tokenizer(impl)
        for text in ["\u0558'll", "ab\u0558cd 12\U00016ff4 x", "I'll \U00011db0'll \U00018e00 done", "\u0558" * 3]:
            assert tok.encode(text) == reference_gpt2.encode(text), (impl, text)
            assert tok.decode(tok.encode(text)) == text


def test_every_code_point_in_context_matches_tiktoken(reference_gpt2):
    """A sample of all code points plus of the drifted ones, each between letters and before "'ll"."""
    tok = gpt2_tokenizer("bpe")
    # Sampling keeps this at a few seconds; the full sweep passed when the tables were made.
    guard = drift_guard()
    chars = EVERY_CHAR[::37] + ("".join(guard.findall(EVERY_CHAR)[::11]) if guard else "")
    for start in range(0, len(chars), 4096):
        block = chars[start : start + 4096]
        text = "|".join(f"a{c}'ll {c}1" for c in block)
        assert tok.encode(text) == reference_gpt2.encode(text), hex(ord(block[0]))
