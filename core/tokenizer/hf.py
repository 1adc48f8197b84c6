"""The tokenizer in a Hugging Face checkpoint directory: ``tokenizer.json`` + ``tokenizer_config.json``.

Hugging Face's ``tokenizer.json`` (the ``tokenizers`` library's format, not
ours in ``tokenizer_json.py``) describes a byte-level BPE as a vocabulary
(token string -> id, bytes spelled with GPT-2's ``bytes_to_unicode``), the merges
in order, the added tokens and the pre-tokenizer steps; ``tokenizer_config.json``
names the bos/eos tokens and carries the chat template.

We read it as ``core.tokenizer.gguf`` reads a GGUF file, which is llama.cpp's
transcription of the same data, and share its checks: token ids serve as BPE
ranks (checked against the merge order, not assumed), special tokens come from
``added_tokens``, and the pre-tokenizer must be one we reproduce exactly
(SmolLM2's digit split + ByteLevel, or GPT-2's ByteLevel). Anything else is
refused rather than tokenized almost right.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.tokenizer.errors import TokenizerFileError
from core.tokenizer.gguf import PRE_TOKENIZER_PATTERNS, check_merge_order, token_text_bytes
from core.tokenizer.tiktoken_backend import TiktokenTokenizer

TOKENIZER_FILE, CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"


class HFTokenizerError(TokenizerFileError):
    """A Hugging Face tokenizer.json that is missing or that we cannot reproduce exactly."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HFTokenizerError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise HFTokenizerError(f"{path}: expected a JSON object")
    return doc


def _pre_tokenizer(doc: dict[str, Any], source: Path) -> str:
    """The name (a key of ``PRE_TOKENIZER_PATTERNS``) of the pre-tokenizer ``doc`` describes."""
    pre = doc.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits")) for s in steps]
    if kinds == [("Digits", True), ("ByteLevel", None)]:
        return "smollm"
    if kinds == [("ByteLevel", None)] and steps[0].get("use_regex", True):
        return "gpt-2"
    raise HFTokenizerError(f"{source}: pre-tokenizer {kinds} is not one scratchgpt reproduces exactly")


def tokenizer_from_hf(directory: str | Path) -> tuple[TiktokenTokenizer, dict[str, Any]]:
    """Build the tokenizer of a Hugging Face checkpoint directory.

    Returns the tokenizer (run by tiktoken, the faster backend) and, as
    ``tokenizer_from_gguf`` does, a metadata dict: ``name`` (the directory's),
    ``pre``, ``bos_id``, ``eos_id``, ``eos_token`` (its text) and
    ``chat_template`` (``None`` when the config has none).
    """
    directory = Path(directory)
    tok_file, cfg_file = directory / TOKENIZER_FILE, directory / CONFIG_FILE
    if not tok_file.is_file():
        raise HFTokenizerError(f"{directory}: {TOKENIZER_FILE} is missing")
    doc = _read_json(tok_file)
    tok_cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        raise HFTokenizerError(f"{tok_file}: model type {model.get('type')!r}; only byte-level BPE is supported")
    pre = _pre_tokenizer(doc, tok_file)

    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise HFTokenizerError(f"{tok_file}: the BPE model has no vocabulary")
    try:
        specials = {str(t["content"]): int(t["id"]) for t in doc.get("added_tokens", []) if t.get("special")}
        id_of = {token: int(i) for token, i in vocab.items() if token not in specials}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HFTokenizerError(f"{tok_file}: malformed vocabulary or added_tokens ({exc!r})") from None
    ranks: dict[bytes, int] = {}
    for token, token_id in id_of.items():
        try:
            ranks[token_text_bytes(token)] = token_id
        except UnicodeEncodeError:
            raise HFTokenizerError(f"{tok_file}: token {token!r} is not a byte-level BPE token") from None
    # Newer files write a merge as a [left, right] pair, older ones as "left right".
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    check_merge_order(merges, id_of, ranks, str(tok_file), error=HFTokenizerError)

    def special(key: str) -> tuple[str | None, int | None]:
        value = tok_cfg.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        return (text, specials.get(text)) if isinstance(text, str) else (None, None)

    (eos_token, eos_id), (_, bos_id) = special("eos_token"), special("bos_token")
    name = directory.name
    tokenizer = TiktokenTokenizer(
        ranks, PRE_TOKENIZER_PATTERNS[pre], specials, name, eos_id=eos_id, bos_id=bos_id,
        unknown_bytes="drop",  # as Hugging Face tokenizers and llama.cpp do for bytes without a token
    )
    template = tok_cfg.get("chat_template")
    info = {
        "name": name, "pre": pre, "bos_id": bos_id, "eos_id": eos_id, "eos_token": eos_token,
        "chat_template": template if isinstance(template, str) else None,
    }
    return tokenizer, info
