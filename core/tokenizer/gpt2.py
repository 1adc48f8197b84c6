"""GPT-2's tokenizer (Radford et al. 2019), offline.

The ranks come from the vendored ``core/assets/gpt2.tiktoken`` (tiktoken's
``r50k_base`` file, MIT licence alongside), checked against its sha256 so a
corrupted or swapped file fails loudly instead of producing wrong ids. The same
ranks drive both backends:

* ``impl="tiktoken"``: ``tiktoken.Encoding`` built from the file (no download);
* ``impl="bpe"``: our from-scratch ``BPETokenizer``.

Both give byte-identical ids on any text, surrogates included: paired
surrogates are joined and lone ones become U+FFFD, which is what tiktoken does
(see ``core.tokenizer.specials.repair_surrogates``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from pathlib import Path
from typing import Literal, Union

from core.tokenizer.bpe import ENDOFTEXT, GPT2_PATTERN, BPETokenizer
from core.tokenizer.errors import TokenizerFileError
from core.tokenizer.tiktoken_backend import TiktokenTokenizer

GPT2_RANKS_FILE = Path(__file__).resolve().parent.parent / "assets" / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257

Impl = Literal["tiktoken", "bpe"]
GPT2Tokenizer = Union[TiktokenTokenizer, BPETokenizer]


class RankFileChecksumError(TokenizerFileError):
    """A rank file's sha256 is not the expected one."""


def load_tiktoken_ranks(path: str | Path, expected_sha256: str | None = None) -> dict[bytes, int]:
    """Read a ``.tiktoken`` rank file: one ``base64(token) rank`` pair per line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerFileError(f"rank file {path} does not exist; reinstall scratchgpt to restore it") from None
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise RankFileChecksumError(
                f"rank file {path} has sha256 {actual}, expected {expected_sha256}: the file is corrupted or "
                "not GPT-2's; restore it from the scratchgpt source tree (core/assets/gpt2.tiktoken)"
            )
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerFileError(f"{path}:{line_no}: expected 'base64-token rank', got {line[:60]!r}") from None
    return ranks


@functools.lru_cache(maxsize=1)
def gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's 50,256 mergeable ranks from the vendored, checksummed file (cached; do not mutate)."""
    return load_tiktoken_ranks(GPT2_RANKS_FILE, GPT2_RANKS_SHA256)


@functools.lru_cache(maxsize=2)
def gpt2_tokenizer(impl: Impl = "tiktoken") -> GPT2Tokenizer:
    """GPT-2's tokenizer; ``<|endoftext|>`` is id 50256. Instances are cached and shared."""
    if impl == "tiktoken":
        return TiktokenTokenizer(gpt2_ranks(), GPT2_PATTERN, {ENDOFTEXT: GPT2_EOT_ID}, "gpt2")
    if impl == "bpe":
        return BPETokenizer(gpt2_ranks(), GPT2_PATTERN, {ENDOFTEXT: GPT2_EOT_ID}, "gpt2")
    raise ValueError(f"unknown tokenizer impl {impl!r}: use 'tiktoken' or 'bpe'")


def is_gpt2(tokenizer: object) -> bool:
    """True when ``tokenizer`` has exactly GPT-2's vocabulary, pattern and special tokens."""
    return (
        getattr(tokenizer, "pattern", None) == GPT2_PATTERN
        and getattr(tokenizer, "special_tokens", None) == {ENDOFTEXT: GPT2_EOT_ID}
        and getattr(tokenizer, "ranks", None) == gpt2_ranks()
    )
