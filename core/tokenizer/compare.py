"""Word, character and BPE tokenization of one text, counted side by side (the book's chapter 2 argument).

A vocabulary learned from a reference text meets a new text: the word-level
tokenizer needs one token per word but has no token for words it never saw;
the character-level one has almost no unknowns but spends a token per letter;
byte-level BPE needs no unknown token at all and lands in between on length.
``compare_tokenizers`` measures exactly these: vocabulary size, tokens, unknown
tokens and tokens per word. The Lab's tokenizer view and notebook 1 show it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import regex

from core.tokenizer.bpe import BPETokenizer
from core.tokenizer.char import CharTokenizer
from core.tokenizer.word import WordTokenizer

_WORD = regex.compile(r"\w+")


@dataclass
class TokenCount:
    key: str
    name: str
    vocab_size: int
    ids: list[int]
    unknown: int  # tokens that stand for a piece the vocabulary lacks (<|unk|>)
    words: int  # words in the text, the same for every tokenizer

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / self.words if self.words else 0.0


def count_words(text: str) -> int:
    """Runs of letters or digits: the yardstick tokens per word is measured against."""
    return len(_WORD.findall(text))


def reference_tokenizers(reference: str, bpe_vocab_size: int | None = None) -> dict[str, tuple[str, Any]]:
    """Word and character tokenizers learned from ``reference`` and, given a size, our BPE trained on it too.

    The BPE gets at most ``bpe_vocab_size`` tokens: a short reference runs out of pairs to merge
    sooner, and its vocabulary size says where.
    """
    tokenizers: dict[str, tuple[str, Any]] = {
        "word": ("Word-level", WordTokenizer.train(reference)),
        "char": ("Character-level", CharTokenizer.train(reference)),
    }
    if bpe_vocab_size is not None:
        bpe = BPETokenizer.train(reference, bpe_vocab_size, at_most=True)
        tokenizers["bpe"] = ("BPE trained on the reference", bpe)
    return tokenizers


def compare_tokenizers(tokenizers: Mapping[str, tuple[str, Any]], text: str) -> list[TokenCount]:
    """``text`` encoded by each tokenizer (key -> (display name, tokenizer)), with its counts.

    Special-token strings are read as ordinary text, so every tokenizer sees the same characters.
    """
    words = count_words(text)
    counts = []
    for key, (name, tokenizer) in tokenizers.items():
        ids = tokenizer.encode_ordinary(text)
        unknown_count = getattr(tokenizer, "unknown_count", None)
        unknown = unknown_count(ids) if unknown_count else 0  # byte-level BPE has no unknown token
        counts.append(TokenCount(key, name, tokenizer.vocab_size, ids, unknown, words))
    return counts
