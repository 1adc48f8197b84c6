"""Word-level tokenization: one token per word or punctuation mark (the book's chapter 2, before BPE).

The vocabulary is the set of words of a training text, so a word it never saw
(a name, a typo, a rarer inflection) becomes ``<|unk|>`` and its meaning is
lost; and every inflection is a token of its own, so a real vocabulary needs
hundreds of thousands of entries. Both problems are why GPT-2 uses BPE.
Spacing is not kept: ``decode`` puts one space between words and none before
punctuation, so a round trip normalises the whitespace.
"""

from __future__ import annotations

import regex

from core.tokenizer.vocab import UNK, UnknownPiece, VocabularyTokenizer

__all__ = ["UNK", "UnknownPiece", "WordTokenizer"]

# A run of letters, digits or underscores (any script), or one other visible
# character: "isn't" is "isn", "'", "t", and "--" is two tokens.
WORD_PATTERN = regex.compile(r"\w+|[^\w\s]")
# Where decode writes no space: before closing punctuation, after opening
# brackets, and on both sides of an apostrophe ("isn't", "Austen's").
_NO_SPACE_BEFORE = set(",.;:!?)]}%'")
_NO_SPACE_AFTER = set("([{$'")


class WordTokenizer(VocabularyTokenizer):
    """Words and punctuation marks as tokens; train it with ``WordTokenizer.train(text)``."""

    kind = "word"

    @staticmethod
    def split(text: str) -> list[str]:
        return WORD_PATTERN.findall(text)

    @staticmethod
    def join(pieces: list[str]) -> str:
        out: list[str] = []
        for i, piece in enumerate(pieces):
            if i and piece not in _NO_SPACE_BEFORE and pieces[i - 1] not in _NO_SPACE_AFTER:
                out.append(" ")
            out.append(piece)
        return "".join(out)
