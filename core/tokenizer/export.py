"""Our byte-level BPE tokenizers in the formats other programs read.

Hugging Face ``tokenizers`` (a ``tokenizer.json`` that ``transformers``, vLLM,
TGI and SGLang load) and llama.cpp (the ``tokenizer.ggml.*`` keys of a GGUF
file) both describe a byte-level BPE (Radford et al., 2019, section 2.2) as a
vocabulary of token *strings*, bytes spelled through GPT-2's
``bytes_to_unicode``, plus the list of merges; we hold ranks (bytes -> id), as
tiktoken does. ``byte_level_vocab`` turns one into the other once, for both
writers: ``hf_tokenizer_json`` here and ``core.weights.export_gguf``.

Three choices keep the ids those programs produce equal to ours:

* the pre-tokenizer is our own regex (a ``Split`` with ``Isolated`` pieces,
  then ``ByteLevel`` without its own regex), not a named default;
* ``ignore_merges``: a piece that is itself a token is that token, as in
  tiktoken and ``BPETokenizer`` (the merges alone could stop short of it);
* special tokens are added tokens, matched whole before the regex runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.tokenizer.bpe import bytes_to_unicode, merges_from_ranks
from core.tokenizer.errors import TokenizerError
from core.tokenizer.gguf import (
    PRE_TOKENIZER_PATTERNS,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_UNUSED,
)


class TokenizerExportError(TokenizerError):
    """A tokenizer that cannot be written in another program's format."""


@dataclass
class ByteLevelVocab:
    """A byte-level BPE vocabulary as token strings and merges, one entry per model row."""

    tokens: list[str]  # id -> token: GPT-2 byte characters, a special token as written, or a padding name
    types: list[int]  # llama.cpp token types: normal, control (special tokens), unused (padding rows)
    merges: list[str]  # "left right", in merge order
    pattern: str  # the pre-tokenizer regex
    special_tokens: dict[str, int]
    bos_id: int | None
    eos_id: int | None

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]


def byte_level_vocab(tokenizer: Any, vocab_size: int) -> ByteLevelVocab:
    """``tokenizer``'s vocabulary spelled for Hugging Face and llama.cpp, padded to the model's ``vocab_size``.

    A model may have more embedding rows than its tokenizer has ids (a vocabulary
    padded to a multiple of 64 for speed); those rows become unused tokens named
    ``[PAD<id>]`` so that a GGUF file still has one token per row.
    """
    ranks = getattr(tokenizer, "ranks", None)
    if ranks is None:
        raise TokenizerExportError(
            f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r} is not a byte-level BPE with ranks; cannot export it"
        )
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerExportError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only {vocab_size} embedding rows"
        )
    spell = bytes_to_unicode()

    def spelled(data: bytes) -> str:
        return "".join(spell[b] for b in data)

    tokens: list[str | None] = [None] * vocab_size
    types = [TOKEN_TYPE_UNUSED] * vocab_size
    for data, token_id in ranks.items():
        tokens[token_id], types[token_id] = spelled(data), TOKEN_TYPE_NORMAL
    for text, token_id in tokenizer.special_tokens.items():
        tokens[token_id], types[token_id] = text, TOKEN_TYPE_CONTROL
    return ByteLevelVocab(
        tokens=[t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)],
        types=types,
        merges=[f"{spelled(a)} {spelled(b)}" for a, b in merges_from_ranks(ranks)],
        pattern=tokenizer.pattern,
        special_tokens=dict(tokenizer.special_tokens),
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
    )


def hf_tokenizer_json(vocab: ByteLevelVocab) -> dict[str, Any]:
    """The ``tokenizer.json`` document of Hugging Face ``tokenizers`` for ``vocab`` (its serialization format)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": token_id, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for text, token_id in sorted(vocab.special_tokens.items(), key=lambda kv: kv[1])
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": vocab.pattern}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {t: i for i, (t, kind) in enumerate(zip(vocab.tokens, vocab.types)) if kind != TOKEN_TYPE_UNUSED},
            "merges": vocab.merges,
        },
    }


def llama_cpp_pre_tokenizer(pattern: str) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for our pre-tokenizer regex; only names it runs exactly."""
    for name, known in PRE_TOKENIZER_PATTERNS.items():
        if known == pattern:
            return name
    raise TokenizerExportError(
        f"the tokenizer's pre-tokenizer regex {pattern!r} has no llama.cpp name; GGUF export knows "
        f"{', '.join(sorted(PRE_TOKENIZER_PATTERNS))}"
    )
