"""The ``tokenizer.json`` file both backends read and write.

Our own format, not Hugging Face's (``hf.py`` reads that one): the ranks a
byte-level BPE needs (bytes -> id, as tiktoken holds them), the pre-tokenizer
regex and the special tokens, so that ``BPETokenizer`` and ``TiktokenTokenizer``
load each other's files and give the same ids::

    {"format": "scratchgpt-bpe", "version": 1, "type": "bpe",
     "name": str, "pattern": str (the pre-tokenizer regex, `regex` module syntax),
     "byte_encoding": "latin-1",
     "ranks": {token: rank, ...}   token bytes decoded as latin-1 (one char per byte,
                                   lossless and readable for ASCII), ordered by rank,
     "special_tokens": {string: id, ...},
     "eos_id": int | null, "bos_id": int | null,
     "unknown_bytes": "error" | "drop"}

Nothing is pickled.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from core.tokenizer.errors import TokenizerFileError

FILE_FORMAT = "scratchgpt-bpe"
FILE_VERSION = 1

_T = TypeVar("_T", bound="TokenizerJson")


class TokenizerJson:
    """``to_dict``/``save``/``load`` for a tokenizer made of ranks, a pattern and special tokens.

    A base class rather than two copies so the two backends cannot drift apart
    in what they write: each only has to hold the attributes below, and its
    constructor must take the keyword arguments ``read_tokenizer_json`` returns.
    """

    name: str
    pattern: str
    ranks: dict[bytes, int]
    special_tokens: dict[str, int]
    eos_id: int | None
    bos_id: int | None
    unknown_bytes: str

    def to_dict(self) -> dict[str, Any]:
        """The ``tokenizer.json`` document (see the module docstring)."""
        return tokenizer_document(
            name=self.name,
            pattern=self.pattern,
            ranks=self.ranks,
            special_tokens=self.special_tokens,
            eos_id=self.eos_id,
            bos_id=self.bos_id,
            unknown_bytes=self.unknown_bytes,
        )

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` to ``path`` (a file path) and return it; either backend's ``load`` reads it."""
        return write_tokenizer_json(path, self.to_dict())

    @classmethod
    def load(cls: type[_T], path: str | Path) -> _T:
        """Read a ``tokenizer.json`` written by either backend."""
        return cls(**read_tokenizer_json(path))


def tokenizer_document(
    *,
    name: str,
    pattern: str,
    ranks: Mapping[bytes, int],
    special_tokens: Mapping[str, int],
    eos_id: int | None,
    bos_id: int | None,
    unknown_bytes: str,
) -> dict[str, Any]:
    """Build the ``tokenizer.json`` document shared by both backends."""
    return {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "type": "bpe",
        "name": name,
        "pattern": pattern,
        "byte_encoding": "latin-1",
        "ranks": {token.decode("latin-1"): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])},
        "special_tokens": dict(special_tokens),
        "eos_id": eos_id,
        "bos_id": bos_id,
        "unknown_bytes": unknown_bytes,
    }


def write_tokenizer_json(path: str | Path, document: dict[str, Any]) -> Path:
    """Write a ``tokenizer.json`` document (UTF-8, one rank per line) and return the path."""
    path = Path(path)
    path.write_text(json.dumps(document, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def read_tokenizer_json(path: str | Path) -> dict[str, Any]:
    """Parse ``tokenizer.json`` into constructor keyword arguments (either backend accepts them)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerFileError(f"tokenizer file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerFileError(f"tokenizer file {path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
        raise TokenizerFileError(
            f"{path} is not a scratchgpt tokenizer file (expected \"format\": \"{FILE_FORMAT}\"); "
            "Hugging Face tokenizer.json files are a different format"
        )
    if doc.get("version") != FILE_VERSION:
        raise TokenizerFileError(
            f"{path} has tokenizer file version {doc.get('version')!r}; this scratchgpt reads version {FILE_VERSION}"
        )
    encoding = doc.get("byte_encoding", "latin-1")
    try:
        if encoding == "latin-1":
            ranks = {token.encode("latin-1"): int(rank) for token, rank in doc["ranks"].items()}
        elif encoding == "base64":
            ranks = {base64.b64decode(token): int(rank) for token, rank in doc["ranks"].items()}
        else:
            raise TokenizerFileError(f"{path}: unknown byte_encoding {encoding!r} (expected 'latin-1' or 'base64')")
        return {
            "ranks": ranks,
            "pattern": doc["pattern"],
            "special_tokens": {str(t): int(i) for t, i in doc.get("special_tokens", {}).items()},
            "name": doc.get("name", path.stem),
            "eos_id": doc.get("eos_id"),
            "bos_id": doc.get("bos_id"),
            "unknown_bytes": doc.get("unknown_bytes", "error"),
        }
    except KeyError as exc:
        raise TokenizerFileError(f"{path} lacks the required field {exc.args[0]!r}") from None
    except (UnicodeEncodeError, ValueError, AttributeError, TypeError) as exc:
        if isinstance(exc, TokenizerFileError):
            raise
        raise TokenizerFileError(f"{path} has a malformed field: {exc}") from None
