"""Errors raised by the tokenizers.

Every error subclasses ``ValueError`` (bad input or a bad file) so callers can
catch one family; each message names the token, file or flag involved and says
what to do next.
"""

from __future__ import annotations


class TokenizerError(ValueError):
    """Base class of every tokenizer error."""


class DisallowedSpecialToken(TokenizerError):
    """The text contains a special token's string that the caller did not allow.

    Encoding it as plain text would let user input forge control tokens (an
    ``<|endoftext|>`` typed into a chat box), so we refuse instead of splitting it.
    """

    def __init__(self, token: str) -> None:
        self.token = token
        super().__init__(
            f"text contains the special token {token!r}, which is not allowed here. "
            f"Pass allowed_special={{{token!r}}} (or allowed_special='all') to encode it as "
            "its special id, or remove it from the text."
        )


class UnknownTokenId(TokenizerError):
    """A token id outside the vocabulary was given to decode."""

    def __init__(self, token_id: int, vocab_size: int, name: str) -> None:
        self.token_id = token_id
        super().__init__(
            f"token id {token_id!r} is not in tokenizer {name!r} (vocab_size={vocab_size}); "
            "were these ids produced by a different tokenizer?"
        )


class UnrepresentableBytes(TokenizerError):
    """The text holds bytes that the vocabulary has no token for.

    Only vocabularies that lack some of the 256 single bytes can raise this
    (SmolLM2's lacks 21); see ``unknown_bytes`` on the tokenizers.
    """


class TokenizerFileError(TokenizerError):
    """A tokenizer file (tokenizer.json, a rank file, encoder.json/vocab.bpe, a GGUF) is unusable."""


class TrainingError(TokenizerError):
    """BPE training cannot reach the requested vocabulary."""
