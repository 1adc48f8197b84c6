"""Incremental detokenization for streamed generation.

A byte-level BPE token can end in the middle of a UTF-8 character (an emoji is
four bytes and often two or three tokens), so decoding token by token would
print replacement characters. ``StreamDecoder`` keeps the bytes of an unfinished
character until the token that completes it arrives, the way a terminal reads
a UTF-8 byte stream. Bytes that can never become valid UTF-8 are replaced with
U+FFFD at once, so the concatenated output always equals ``tokenizer.decode``
of all the ids.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.tokenizer import Tokenizer


class StreamDecoder:
    """Turn a stream of token ids into a stream of complete text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly ``""``)."""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id), final=False)

    def push_many(self, token_ids: list[int]) -> str:
        """Add several tokens at once; return the text they complete."""
        return self._decoder.decode(self.tokenizer.decode_bytes(token_ids), final=False)

    def flush(self) -> str:
        """End the stream: decode what is left, an unfinished character becoming U+FFFD."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

    @property
    def pending(self) -> bytes:
        """The bytes of a character not yet complete."""
        return self._decoder.getstate()[0]
