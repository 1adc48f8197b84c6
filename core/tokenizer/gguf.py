"""The tokenizer stored in a GGUF file (llama.cpp's format), e.g. SmolLM2's.

A GGUF file keeps a byte-level BPE vocabulary as metadata: ``tokenizer.ggml.model
= 'gpt2'``, the token strings (bytes through GPT-2's ``bytes_to_unicode``), the
merges, a type per token (1 normal, 3 control, ...), the bos/eos ids, the name
of the pre-tokenizer (``tokenizer.ggml.pre``) and the chat template.

Building a tokenizer from it:

* **ids as ranks.** The normal tokens are the 256 single bytes and one token per
  merge, numbered in merge order, so a token's id *is* its rank; we check that
  instead of assuming it. Control tokens become special tokens.
* **pre-tokenizer.** ``'smollm'`` isolates every ``\\p{N}`` character, then applies
  GPT-2's rule (llama.cpp; SmolLM2's original ``Digits(individual_digits=True)``
  + ``ByteLevel``). ``SMOLLM_PATTERN`` is one regex with exactly those pieces.
* **absent bytes.** SmolLM2's vocabulary lacks 21 byte values (0x04, 0x06, 0x13,
  0x14, 0x16, 0x1d, 0xc0, 0xc1, 0xf1, 0xf2, 0xf5-0xff). Most can never occur in
  UTF-8; the others are rare control characters and code points U+40000 to
  U+BFFFF. We **drop** them (``unknown_bytes='drop'``), which is what the model's
  reference tokenizers (Hugging Face ``tokenizers``, llama.cpp) do, so a stray
  control character in a prompt does not fail a request. Build the tokenizer
  with ``unknown_bytes='error'`` to raise ``UnrepresentableBytes`` instead.

Reading the metadata with the ``gguf`` package parses every tensor header and
field into numpy views (seconds for SmolLM2: docs/performance.md); ``read_gguf_metadata`` reads
only the key/value section with ``struct`` and skips the arrays it does not need.
"""

from __future__ import annotations

import functools
import mmap
import struct
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

from core.tokenizer.bpe import GPT2_PATTERN, BPETokenizer, UnknownBytes, bytes_to_unicode
from core.tokenizer.errors import TokenizerFileError
from core.tokenizer.tiktoken_backend import TiktokenTokenizer

# Each \p{N} alone, then GPT-2's rule; `\s+(?=\p{N})` keeps a whitespace run
# before a digit whole, as the digit split leaves it as its own span.
SMOLLM_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++|\s+(?=\p{N})|\s+(?!\S)|\s"""

# llama.cpp's tokenizer.ggml.pre names that we can reproduce exactly.
PRE_TOKENIZER_PATTERNS = {"smollm": SMOLLM_PATTERN, "gpt-2": GPT2_PATTERN}

# tiktoken encodes several times faster than our BPE on the same ranks and gives the
# same ids (`python bench/tokenizer.py --gguf ...`; figures in docs/performance.md,
# "Tokenizer"), so it is the default.
DEFAULT_GGUF_IMPL: Literal["tiktoken", "bpe"] = "tiktoken"

TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL = 1, 2, 3
TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNUSED, TOKEN_TYPE_BYTE = 4, 5, 6

GGUFTokenizer = Union[TiktokenTokenizer, BPETokenizer]


class GGUFTokenizerError(TokenizerFileError):
    """A GGUF file's tokenizer cannot be read or reproduced."""


# ---------------------------------------------------------------- metadata reader

_GGUF_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_metadata(path: str | Path, *, arrays: tuple[str, ...] = ("tokenizer.",)) -> dict[str, Any]:
    """Read a GGUF file's key/value metadata (not its tensors).

    Scalars and strings are always returned; array values only for keys that
    start with one of ``arrays`` (others are skipped without decoding). Strings
    inside ``tokenizer.ggml.tokens``/``merges`` stay ``str``; numeric arrays
    become tuples.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_metadata(buf, path, arrays)
    except FileNotFoundError:
        raise GGUFTokenizerError(f"GGUF file {path} does not exist") from None
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        if isinstance(exc, GGUFTokenizerError):
            raise
        raise GGUFTokenizerError(f"{path} is truncated or not a GGUF file: {exc}") from None


def _parse_metadata(buf: Any, path: Path, arrays: tuple[str, ...]) -> dict[str, Any]:
    if buf[:4] != _GGUF_MAGIC:
        raise GGUFTokenizerError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version not in (2, 3):
        hint = " (it looks big-endian, which is not supported)" if version > 0xFFFF else ""
        raise GGUFTokenizerError(f"{path}: GGUF version {version} is not supported (2 and 3 are){hint}")
    _tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
    offset = 24

    def read_string(off: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", buf, off)
        off += 8
        return bytes(buf[off : off + length]).decode("utf-8"), off + length

    def read_value(kind: int, off: int, keep: bool) -> tuple[Any, int]:
        if kind == _STRING:
            return read_string(off)
        if kind in _SCALAR_FORMATS:
            fmt = "<" + _SCALAR_FORMATS[kind]
            return struct.unpack_from(fmt, buf, off)[0], off + struct.calcsize(fmt)
        if kind != _ARRAY:
            raise GGUFTokenizerError(f"{path}: unknown GGUF value type {kind} at byte {off}")
        item_kind, count = struct.unpack_from("<IQ", buf, off)
        off += 12
        if item_kind in _SCALAR_FORMATS:
            fmt = "<" + _SCALAR_FORMATS[item_kind]
            size = struct.calcsize(fmt) * count
            values = struct.unpack_from(f"<{count}{_SCALAR_FORMATS[item_kind]}", buf, off) if keep else None
            return values, off + size
        if item_kind == _STRING:
            unpack_len = struct.Struct("<Q").unpack_from
            strings: list[str] = []
            append = strings.append
            for _ in range(count):
                (length,) = unpack_len(buf, off)
                off += 8
                if keep:
                    append(buf[off : off + length].decode("utf-8"))
                off += length
            return (strings if keep else None), off
        items = []
        for _ in range(count):  # arrays of arrays: rare, read generically
            item, off = read_value(item_kind, off, keep)
            items.append(item)
        return (items if keep else None), off

    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key, offset = read_string(offset)
        (kind,) = struct.unpack_from("<I", buf, offset)
        offset += 4
        keep = kind != _ARRAY or key.startswith(arrays)
        value, offset = read_value(kind, offset, keep)
        if keep:
            metadata[key] = value
    return metadata


def _metadata_from_reader(reader: Any) -> dict[str, Any]:
    """The same dictionary from an already opened ``gguf.GGUFReader``."""
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        kinds = [int(t) for t in field.types]
        if not kinds:
            continue
        if kinds[0] == _ARRAY and not key.startswith("tokenizer."):
            continue
        if kinds[-1] == _STRING:
            values = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        else:
            values = [field.parts[i][0].item() for i in field.data]
        metadata[key] = values if kinds[0] == _ARRAY else values[0]
    return metadata


# ---------------------------------------------------------------- tokenizer


def tokenizer_from_gguf(
    path_or_reader: str | Path | Any,
    impl: Literal["tiktoken", "bpe"] | None = None,
    *,
    unknown_bytes: UnknownBytes = "drop",
) -> tuple[GGUFTokenizer, dict[str, Any]]:
    """Build the tokenizer stored in a GGUF file.

    ``path_or_reader`` is a path or an open ``gguf.GGUFReader``. Returns the
    tokenizer (``impl`` defaults to ``DEFAULT_GGUF_IMPL``) and a metadata dict:
    ``chat_template``, ``bos_id``, ``eos_id``, ``eos_token`` (its text), ``unk_id``, ``pad_id``,
    ``add_bos_token``, ``add_eos_token``, ``model``, ``pre``, ``name``,
    ``vocab_size`` and ``absent_bytes`` (byte values without a token).
    """
    if isinstance(path_or_reader, (str, Path)):
        source = str(path_or_reader)
        meta = read_gguf_metadata(path_or_reader)
    else:
        source = str(getattr(path_or_reader, "path", "GGUFReader"))
        meta = _metadata_from_reader(path_or_reader)
    impl = impl or DEFAULT_GGUF_IMPL
    if impl not in ("tiktoken", "bpe"):
        raise ValueError(f"unknown tokenizer impl {impl!r}: use 'tiktoken' or 'bpe'")

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFTokenizerError(
            f"{source}: tokenizer.ggml.model is {model!r}; only byte-level BPE vocabularies ('gpt2') "
            "are supported, not SentencePiece ('llama') or others"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_PATTERNS:
        raise GGUFTokenizerError(
            f"{source}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported "
            f"(supported: {', '.join(sorted(PRE_TOKENIZER_PATTERNS))})"
        )
    try:
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges: list[str] = meta["tokenizer.ggml.merges"]
    except KeyError as exc:
        raise GGUFTokenizerError(f"{source} has no {exc.args[0]} metadata") from None
    types = meta.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFTokenizerError(f"{source}: {len(tokens)} tokens but {len(types)} token types")

    ranks, specials = _ranks_and_specials(tokens, types, source)
    normal_ids = set(ranks.values())
    check_merge_order(merges, {token: i for i, token in enumerate(tokens) if i in normal_ids}, ranks, source)

    def token_id(key: str) -> int | None:
        value = meta.get(key)
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    eos_id, bos_id = token_id("tokenizer.ggml.eos_token_id"), token_id("tokenizer.ggml.bos_token_id")
    name = str(meta.get("general.basename") or meta.get("general.name") or Path(source).stem)
    cls = TiktokenTokenizer if impl == "tiktoken" else BPETokenizer
    tokenizer = cls(
        ranks,
        PRE_TOKENIZER_PATTERNS[pre],
        specials,
        name,
        eos_id=eos_id,
        bos_id=bos_id,
        unknown_bytes=unknown_bytes,
    )
    info = {
        "model": model,
        "pre": pre,
        "name": name,
        "vocab_size": len(tokens),
        "bos_id": bos_id,
        "eos_id": eos_id,
        "eos_token": tokens[eos_id] if eos_id is not None else None,
        "unk_id": token_id("tokenizer.ggml.unknown_token_id"),
        "pad_id": token_id("tokenizer.ggml.padding_token_id"),
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token"),
        "add_eos_token": meta.get("tokenizer.ggml.add_eos_token"),
        "chat_template": meta.get("tokenizer.chat_template"),
        "absent_bytes": [b for b in range(256) if bytes((b,)) not in ranks],
    }
    return tokenizer, info


@functools.lru_cache(maxsize=1)
def _byte_text_table() -> dict[int, str]:
    """str.translate table from GPT-2's byte characters to latin-1 characters (one per byte).

    Token strings spell bytes with GPT-2's printable characters; translating
    then encoding as latin-1 does the conversion in C. Characters outside the
    map become U+FFFF, which latin-1 cannot encode, so they fail loudly.
    """
    table = {ord(char): chr(b) for b, char in bytes_to_unicode().items()}
    for code in range(256):
        table.setdefault(code, "\uffff")
    return table


def token_text_bytes(token: str) -> bytes:
    """A GPT-2-style token string to its bytes; ``UnicodeEncodeError`` if it is not one.

    GGUF files and Hugging Face ``tokenizer.json`` files (``core.tokenizer.hf``)
    both spell tokens this way."""
    return token.translate(_byte_text_table()).encode("latin-1")


def _ranks_and_specials(tokens: list[str], types: Any, source: str) -> tuple[dict[bytes, int], dict[str, int]]:
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for token_id, (token, kind) in enumerate(zip(tokens, types)):
        if kind == TOKEN_TYPE_NORMAL:
            try:
                data = token_text_bytes(token)
            except UnicodeEncodeError:
                raise GGUFTokenizerError(
                    f"{source}: normal token {token_id} {token!r} is not a byte-level BPE token"
                ) from None
            if data in ranks:
                raise GGUFTokenizerError(f"{source}: tokens {ranks[data]} and {token_id} are the same bytes {data!r}")
            ranks[data] = token_id
        elif kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
            specials[token] = token_id
        elif kind != TOKEN_TYPE_UNUSED:
            raise GGUFTokenizerError(
                f"{source}: token {token_id} {token!r} has type {kind}, which byte-level BPE vocabularies "
                "do not use (expected 1 normal, 3 control, 4 user-defined or 5 unused)"
            )
    return ranks, specials


def check_merge_order(
    merges: Sequence[str],
    id_of: Mapping[str, int],
    ranks: Mapping[bytes, int],
    source: str,
    error: type[TokenizerFileError] = GGUFTokenizerError,
) -> None:
    """Check that merge k makes a token whose id grows with k, so ids work as ranks.

    ``id_of`` maps the normal (non-special) token strings to their ids; each
    merge is ``"left right"``. Works on the token strings: GPT-2's byte
    characters map one-to-one to bytes, so joining two strings joins their
    bytes. Shared with the Hugging Face reader (``core.tokenizer.hf``), which
    passes its own ``error``.
    """
    previous = -1
    for k, merge in enumerate(merges):
        left, sep, right = merge.partition(" ")
        made, a, b = id_of.get(left + right), id_of.get(left), id_of.get(right)
        if not sep or made is None or a is None or b is None:
            raise error(f"{source}: merge {k} {merge!r} uses or makes a token absent from the vocabulary")
        if made <= previous or made <= a or made <= b:
            raise error(
                f"{source}: merge {k} {merge!r} makes token {made}, out of merge order; "
                "this vocabulary's ids cannot serve as BPE ranks"
            )
        previous = made
    multi_byte = sum(1 for token in ranks if len(token) > 1)
    if multi_byte != len(merges):
        raise error(
            f"{source}: {multi_byte} multi-byte normal tokens but {len(merges)} merges; "
            "tokens that no merge makes are not supported"
        )
