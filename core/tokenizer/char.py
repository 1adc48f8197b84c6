"""Character-level tokenization: one token per Unicode character (as in Karpathy's char-rnn and nanoGPT's Shakespeare).

The vocabulary is the set of characters of a training text: a few dozen for
English, so the embedding table is tiny and almost nothing is unknown (a
character the text never had, an emoji say, becomes ``<|unk|>``). The price is
length: every word costs as many tokens as it has letters, so a context
window holds four to five times less text than with BPE. ``decode`` joins the
characters back, so a round trip without unknowns is exact.
"""

from __future__ import annotations

from core.tokenizer.vocab import UNK, UnknownPiece, VocabularyTokenizer

__all__ = ["UNK", "CharTokenizer", "UnknownPiece"]


class CharTokenizer(VocabularyTokenizer):
    """Characters as tokens; train it with ``CharTokenizer.train(text)``."""

    kind = "char"

    @staticmethod
    def split(text: str) -> list[str]:
        return list(text)

    @staticmethod
    def join(pieces: list[str]) -> str:
        return "".join(pieces)
