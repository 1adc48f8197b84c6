"""Lookup-table tokenizers: the text cut into pieces, each piece one id from a fixed vocabulary.

This is the tokenization that comes before BPE in the book's chapter 2: build a
vocabulary from a training text, map each piece of new text to its id, and map
a piece the vocabulary lacks to ``<|unk|>``. What a piece is decides the
trade-off: whole words (``word.py``) give short sequences but a large
vocabulary with unknown words; single characters (``char.py``) give a tiny
vocabulary with almost no unknowns but long sequences. Byte-level BPE
(``bpe.py``) sits between the two and has no unknowns at all.

The classes here follow the ``Tokenizer`` protocol of ``core.tokenizer``
(special tokens, ``encode``/``encode_ordinary``, ``decode``/``decode_bytes``,
``token_bytes``) so they run wherever our BPE runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from core.tokenizer.bpe import ENDOFTEXT
from core.tokenizer.errors import TokenizerError, TrainingError, UnknownTokenId
from core.tokenizer.specials import (
    AllowedSpecial,
    check_disallowed,
    repair_surrogates,
    resolve_allowed,
    special_regex,
    split_on_specials,
)

UNK = "<|unk|>"


class UnknownPiece(TokenizerError):
    """A piece of text that is not in the vocabulary, from a tokenizer built without ``<|unk|>``."""


class VocabularyTokenizer:
    """A tokenizer that is a table from pieces to ids; subclasses say how text splits into pieces and joins back.

    Ordinary pieces take ids 0..n-1, the special tokens the ids after them (as
    in our BPE). ``unk_id`` is ``<|unk|>``'s id, or None when the vocabulary has
    no unknown token (then an unknown piece raises ``UnknownPiece``).
    """

    kind = "vocabulary"

    def __init__(
        self, pieces: Sequence[str], special_tokens: Sequence[str] = (ENDOFTEXT, UNK), name: str | None = None
    ) -> None:
        self.name = name or self.kind
        self.pieces = list(pieces)
        self._ids = {piece: i for i, piece in enumerate(self.pieces)}
        if len(self._ids) != len(self.pieces):
            raise ValueError(f"tokenizer {self.name!r}: a piece appears twice in the vocabulary")
        specials = list(dict.fromkeys(special_tokens))
        clash = [s for s in specials if s in self._ids]
        if clash:
            raise ValueError(f"tokenizer {self.name!r}: special token {clash[0]!r} is also an ordinary piece")
        self.special_tokens = {token: len(self.pieces) + i for i, token in enumerate(specials)}
        self._strings = self.pieces + specials  # id -> string
        self.vocab_size = len(self._strings)
        self.eos_id = self.special_tokens.get(ENDOFTEXT)
        self.bos_id: int | None = None
        self.unk_id = self.special_tokens.get(UNK)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"

    # -- what a subclass defines -----------------------------------------------

    @staticmethod
    def split(text: str) -> list[str]:
        """The pieces of ``text``, each of which becomes one token."""
        raise NotImplementedError

    @staticmethod
    def join(pieces: list[str]) -> str:
        """Text from pieces: the inverse of ``split`` as far as the pieces allow."""
        raise NotImplementedError

    # -- training ----------------------------------------------------------------

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int | None = None,
        special_tokens: Sequence[str] = (ENDOFTEXT, UNK),
        min_count: int = 1,
        name: str | None = None,
    ) -> VocabularyTokenizer:
        """The vocabulary of ``text``: every piece seen at least ``min_count`` times.

        ``vocab_size`` (special tokens included, as for ``BPETokenizer.train``)
        keeps only the most frequent pieces, ties going to the piece that sorts
        first; the kept pieces take ids in sorted order, as the book's
        chapter 2 vocabulary does. Special-token strings in ``text`` are not
        counted as pieces.
        """
        specials = list(dict.fromkeys(special_tokens))
        text = repair_surrogates(text)
        chunks = special_regex(frozenset(specials)).split(text) if specials else [text]
        counts = Counter(piece for chunk in chunks for piece in cls.split(chunk))
        kept = sorted((p for p, c in counts.items() if c >= min_count), key=lambda p: (-counts[p], p))
        if not kept:
            raise TrainingError(f"the training text has no piece seen {min_count} time(s); give it some text")
        if vocab_size is not None:
            if vocab_size <= len(specials):
                raise TrainingError(
                    f"vocab_size={vocab_size} leaves no room for pieces beside {len(specials)} special token(s)"
                )
            kept = kept[: vocab_size - len(specials)]
        return cls(sorted(kept), specials, name)

    # -- encode --------------------------------------------------------------------

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Text to ids; special-token strings raise ``DisallowedSpecialToken`` unless allowed, as in our BPE."""
        allowed = resolve_allowed(allowed_special, self.special_tokens)
        check_disallowed(text, self.special_tokens, allowed)
        ids: list[int] = []
        for chunk, is_special in split_on_specials(repair_surrogates(text), allowed):
            ids.extend([self.special_tokens[chunk]] if is_special else self.encode_ordinary(chunk))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Text to ids, special-token strings read as ordinary text; unknown pieces become ``<|unk|>``."""
        ids = []
        for piece in self.split(repair_surrogates(text)):
            token_id = self._ids.get(piece, self.unk_id)
            if token_id is None:
                raise UnknownPiece(
                    f"{piece!r} is not in the vocabulary of tokenizer {self.name!r}, which has no {UNK} token; "
                    f"train it with {UNK} among its special tokens, or on text that has this piece"
                )
            ids.append(token_id)
        return ids

    def unknown_count(self, ids: Iterable[int]) -> int:
        """How many of ``ids`` are ``<|unk|>``: pieces the vocabulary did not have."""
        return 0 if self.unk_id is None else sum(1 for i in ids if i == self.unk_id)

    # -- decode --------------------------------------------------------------------

    def _string(self, token_id: int) -> str:
        try:
            if token_id < 0:
                raise IndexError
            return self._strings[token_id]
        except (IndexError, TypeError):
            raise UnknownTokenId(token_id, self.vocab_size, self.name) from None

    def token_bytes(self, token_id: int) -> bytes:
        """One token's UTF-8 bytes (a special token's string for a special token)."""
        return self._string(token_id).encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; ``<|unk|>`` stays ``<|unk|>``: what it stood for is gone."""
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
            ids = ids.tolist()
        return self.join([self._string(i) for i in ids])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """``decode`` as UTF-8 bytes (pieces are whole characters, so nothing is cut)."""
        return self.decode(ids).encode("utf-8")
