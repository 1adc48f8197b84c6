"""Tokenizers: the ``Tokenizer`` protocol, its two backends, and checkpoint (de)serialization.

* ``BPETokenizer`` (``bpe.py``): byte-level BPE from scratch, trainable.
* ``WordTokenizer`` (``word.py``) and ``CharTokenizer`` (``char.py``): the
  lookup-table tokenizers BPE replaced (``vocab.py``), trainable, with ``<|unk|>``
  for what their vocabulary lacks; for comparing the three (the Lab, notebook 1).
* ``TiktokenTokenizer`` (``tiktoken_backend.py``): the same vocabularies run by tiktoken.
* ``gpt2_tokenizer(impl)`` (``gpt2.py``): GPT-2's encoding from the vendored rank file.
* ``tokenizer_from_gguf(path)`` (``gguf.py``): the vocabulary inside a GGUF file (SmolLM2).
* ``tokenizer_from_hf(dir)`` (``hf.py``): a Hugging Face ``tokenizer.json`` + ``tokenizer_config.json``.
* ``StreamDecoder`` (``streaming.py``): UTF-8-safe incremental decoding.

A checkpoint's ``config.json`` names its tokenizer with a small spec:
``{"type": "gpt2", "impl": "tiktoken" | "bpe"}`` or
``{"type": "bpe", "file": "tokenizer.json", "impl": ...}``; ``save_tokenizer``
writes one (and ``tokenizer.json`` when the vocabulary is not GPT-2's) and
``load_tokenizer`` reads it back.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from core.tokenizer.bpe import ENDOFTEXT, GPT2_PATTERN, BPETokenizer
from core.tokenizer.char import CharTokenizer
from core.tokenizer.errors import (
    DisallowedSpecialToken,
    TokenizerError,
    TokenizerFileError,
    TrainingError,
    UnknownTokenId,
    UnrepresentableBytes,
)
from core.tokenizer.gguf import tokenizer_from_gguf
from core.tokenizer.gpt2 import GPT2_EOT_ID, gpt2_tokenizer, is_gpt2
from core.tokenizer.hf import tokenizer_from_hf
from core.tokenizer.specials import AllowedSpecial
from core.tokenizer.streaming import StreamDecoder
from core.tokenizer.tiktoken_backend import TiktokenTokenizer
from core.tokenizer.tokenizer_json import read_tokenizer_json, write_tokenizer_json
from core.tokenizer.vocab import UNK, UnknownPiece
from core.tokenizer.word import WordTokenizer

__all__ = [
    "ENDOFTEXT",
    "GPT2_EOT_ID",
    "GPT2_PATTERN",
    "BPETokenizer",
    "CharTokenizer",
    "DisallowedSpecialToken",
    "StreamDecoder",
    "TiktokenTokenizer",
    "Tokenizer",
    "TokenizerError",
    "TokenizerFileError",
    "TrainingError",
    "UNK",
    "UnknownPiece",
    "UnknownTokenId",
    "UnrepresentableBytes",
    "WordTokenizer",
    "gpt2_tokenizer",
    "load_tokenizer",
    "save_tokenizer",
    "tokenize_file",
    "tokenizer_from_gguf",
    "tokenizer_from_hf",
]

TOKENIZER_FILE = "tokenizer.json"
Impl = Literal["tiktoken", "bpe"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the model, generation and the service need from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int | None
    bos_id: int | None
    special_tokens: dict[str, int]

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Text to ids; special-token strings raise ``DisallowedSpecialToken`` unless allowed."""
        ...

    def encode_ordinary(self, text: str) -> list[int]:
        """Text to ids with special-token strings encoded as plain text (for untrusted input)."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; invalid UTF-8 becomes U+FFFD."""
        ...

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids to raw bytes (may end inside a character)."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """One token's bytes."""
        ...


class TokenizerSpecError(TokenizerError):
    """The ``tokenizer`` entry of a checkpoint's config.json is not understood."""


def impl_of(tokenizer: Tokenizer) -> Impl:
    """Which backend runs ``tokenizer``."""
    return "tiktoken" if isinstance(tokenizer, TiktokenTokenizer) else "bpe"


def load_tokenizer(spec: dict[str, Any] | None, checkpoint_dir: str | Path) -> Tokenizer:
    """Build the tokenizer a checkpoint's config.json ``tokenizer`` entry names.

    ``spec`` is ``{"type": "gpt2", "impl": ...}`` or ``{"type": "bpe", "file":
    "tokenizer.json", "impl": ...}``; ``impl`` is ``"tiktoken"`` (the default,
    faster) or ``"bpe"``. A missing spec means GPT-2, the book's tokenizer.
    """
    checkpoint_dir = Path(checkpoint_dir)
    spec = dict(spec or {"type": "gpt2"})
    kind = spec.get("type")
    impl = spec.get("impl") or "tiktoken"
    if impl not in ("tiktoken", "bpe"):
        raise TokenizerSpecError(
            f"{checkpoint_dir / 'config.json'}: tokenizer impl {impl!r} is unknown; use 'tiktoken' or 'bpe'"
        )
    if kind == "gpt2":
        return gpt2_tokenizer(impl)
    if kind == "bpe":
        file_name = spec.get("file") or TOKENIZER_FILE
        path = checkpoint_dir / file_name
        if not path.is_file():
            raise TokenizerFileError(
                f"{checkpoint_dir / 'config.json'} names tokenizer file {file_name!r}, but {path} does not exist"
            )
        fields = read_tokenizer_json(path)
        return TiktokenTokenizer(**fields) if impl == "tiktoken" else BPETokenizer(**fields)
    raise TokenizerSpecError(
        f"{checkpoint_dir / 'config.json'}: tokenizer type {kind!r} is unknown; expected 'gpt2' or 'bpe'"
    )


def save_tokenizer(tokenizer: Tokenizer, checkpoint_dir: str | Path, impl: Impl | None = None) -> dict[str, Any]:
    """Store ``tokenizer`` with a checkpoint and return the spec for config.json.

    GPT-2's vocabulary is recorded by name only; any other (trained, from a
    GGUF) is written to ``tokenizer.json`` so the checkpoint is self-contained.
    ``impl`` defaults to the backend ``tokenizer`` runs on.
    """
    impl = impl or impl_of(tokenizer)
    if is_gpt2(tokenizer):
        return {"type": "gpt2", "impl": impl}
    to_dict = getattr(tokenizer, "to_dict", None)
    if to_dict is None:
        raise TypeError(
            f"cannot save tokenizer {getattr(tokenizer, 'name', tokenizer)!r} of type {type(tokenizer).__name__}: "
            "only BPETokenizer and TiktokenTokenizer can be written to tokenizer.json"
        )
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer_json(checkpoint_dir / TOKENIZER_FILE, to_dict())
    return {"type": "bpe", "file": TOKENIZER_FILE, "impl": impl}


def tokenize_file(path: str | Path, impl: Impl = "tiktoken", allowed_special: AllowedSpecial = frozenset()) -> list[int]:
    """GPT-2 token ids of a UTF-8 text file (``scratchgpt tokenize --file PATH``).

    ``<|endoftext|>`` in the file raises ``DisallowedSpecialToken`` unless
    ``allowed_special`` allows it.
    """
    path = Path(path)
    try:
        # Bytes, not read_text: text mode would turn "\r\n" into "\n" and change the ids.
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise TokenizerFileError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise TokenizerFileError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    return gpt2_tokenizer(impl).encode(text, allowed_special=allowed_special)
