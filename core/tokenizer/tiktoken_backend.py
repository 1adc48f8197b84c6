"""The fast backend: the same ranks and pre-tokenizer run by tiktoken's Rust core.

``TiktokenTokenizer`` takes exactly what ``BPETokenizer`` takes (ranks, pattern,
special tokens) and gives the same ids, several times faster. It never touches
the network: the ``tiktoken.Encoding`` is built from ranks we already hold.

tiktoken needs a token for each of the 256 single bytes. A vocabulary lacking
some (SmolLM2's) gets placeholder ranks past the vocabulary for them, and any
text that contains such a byte is encoded by the from-scratch BPE instead,
which applies the ``unknown_bytes`` policy (drop or raise) exactly like the
reference implementations; the placeholders therefore never reach the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import tiktoken

from core.tokenizer.bpe import BPETokenizer, UnknownBytes
from core.tokenizer.errors import UnknownTokenId
from core.tokenizer.specials import AllowedSpecial, check_disallowed, repair_surrogates, resolve_allowed
from core.tokenizer.tokenizer_json import TokenizerJson


class TiktokenTokenizer(TokenizerJson):
    """A ``Tokenizer`` whose encode/decode run in tiktoken."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        pattern: str,
        special_tokens: Mapping[str, int] | None = None,
        name: str = "bpe",
        *,
        eos_id: int | None = None,
        bos_id: int | None = None,
        unknown_bytes: UnknownBytes = "error",
    ) -> None:
        # The from-scratch twin validates the arguments, owns the unknown-byte
        # policy and is the reference this backend must agree with.
        self._bpe = BPETokenizer(
            ranks, pattern, special_tokens, name, eos_id=eos_id, bos_id=bos_id, unknown_bytes=unknown_bytes, cache_size=4096
        )
        self.name = name
        self.pattern = pattern
        self.ranks = ranks
        self.special_tokens = dict(self._bpe.special_tokens)
        self.vocab_size = self._bpe.vocab_size
        self.eos_id = self._bpe.eos_id
        self.bos_id = self._bpe.bos_id
        self.unknown_bytes = unknown_bytes

        self._missing = bytes(b for b in range(256) if bytes((b,)) not in ranks)
        mergeable = ranks
        if self._missing:
            first_free = self.vocab_size
            mergeable = dict(ranks)
            for offset, b in enumerate(self._missing):
                mergeable[bytes((b,))] = first_free + offset
        self.encoding = tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks=mergeable, special_tokens=self.special_tokens
        )

    def __repr__(self) -> str:
        return f"TiktokenTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, specials={len(self.special_tokens)})"

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Encode ``text``; same contract as ``BPETokenizer.encode``."""
        allowed = resolve_allowed(allowed_special, self.special_tokens)
        check_disallowed(text, self.special_tokens, allowed)
        if self._missing and self._has_missing_bytes(text):
            return self._bpe.encode(text, allowed)
        # tiktoken repairs surrogates itself, the same way repair_surrogates does.
        return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` treating special-token strings as plain text."""
        if self._missing and self._has_missing_bytes(text):
            return self._bpe.encode_ordinary(text)
        return self.encoding.encode_ordinary(text)

    def _has_missing_bytes(self, text: str) -> bool:
        data = repair_surrogates(text).encode("utf-8")
        return len(data.translate(None, self._missing)) != len(data)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token gives its UTF-8 string)."""
        return self._bpe.token_bytes(token_id)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenate the bytes of ``ids``; may end inside a UTF-8 character."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        elif not isinstance(ids, list):
            ids = list(ids)
        # tiktoken would also decode our placeholder ranks, which are not tokens.
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise UnknownTokenId(bad, self.vocab_size, self.name)
        try:
            return self.encoding.decode_bytes(ids)
        except (KeyError, TypeError, OverflowError):
            return self._bpe.decode_bytes(ids)  # raises UnknownTokenId naming the bad id

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ``ids`` to text; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def merge_steps(self, word: str | bytes) -> list[list[bytes]]:
        """The BPE merges applied to one pre-token, step by step (see ``BPETokenizer.merge_steps``)."""
        return self._bpe.merge_steps(word)

    def pretokenize(self, text: str) -> list[str]:
        """The pre-tokenizer's pieces of ``text``."""
        return self._bpe.pretokenize(text)

    def as_bpe(self) -> BPETokenizer:
        """The from-scratch tokenizer with the same vocabulary."""
        return self._bpe
