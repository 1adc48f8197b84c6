"""The pre-tokenizer: the regex that cuts text into pieces before BPE merges.

GPT-2 (Radford et al. 2019, section 2.2) splits text with a regular expression
so merges never join a word with the punctuation or space around it. Patterns
are written in tiktoken's syntax (``\\p{L}``, possessive ``++``) and compiled
with the ``regex`` module.

The ``regex`` module's Unicode tables are newer than the Rust regex tiktoken
uses, so its ``\\p{L}``/``\\p{N}`` contain characters tiktoken considers
unassigned. ``unicode_classes`` pins both to tiktoken's Unicode version; since a
pinned pattern of explicit ranges is many times slower, we split with the
ordinary pattern and switch to the pinned one only for text that contains one
of the drifted characters (which the tokenizer detects on its cache misses).
"""

from __future__ import annotations

import regex

from core.tokenizer.unicode_classes import drift_guard, pin_unicode_classes


class PreTokenizer:
    """A compiled pre-tokenizer pattern with its Unicode-pinned twin."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        try:
            self._fast = regex.compile(pattern)
        except regex.error as exc:
            raise ValueError(f"invalid pre-tokenizer pattern {pattern!r}: {exc}") from None
        pinned = pin_unicode_classes(pattern)
        self._pinned_source = pinned if pinned != pattern else None
        self._pinned: regex.Pattern[str] | None = None

    def split(self, text: str) -> list[str]:
        """The pieces of ``text``, exactly as tiktoken cuts them."""
        pieces = self._fast.findall(text)
        if self.has_drifted(text):
            return self.split_pinned(text)
        return pieces

    def split_fast(self, text: str) -> list[str]:
        """The pieces by the ``regex`` module's own tables; equal to ``split`` unless ``has_drifted(text)``."""
        return self._fast.findall(text)

    def split_pinned(self, text: str) -> list[str]:
        """The pieces with ``\\p{L}``/``\\p{N}`` pinned to explicit ranges (always exact, slower)."""
        if self._pinned is None:
            self._pinned = regex.compile(self._pinned_source or self.pattern)
        return self._pinned.findall(text)

    def has_drifted(self, text: str) -> bool:
        """Whether ``text`` holds a character the two Unicode versions classify differently."""
        if self._pinned_source is None or text.isascii():
            return False
        guard = drift_guard()
        return guard is not None and guard.search(text) is not None
