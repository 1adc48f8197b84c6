"""The tokenizer in a Hugging Face directory (tokenizer.json + tokenizer_config.json): the same ids as
Hugging Face's own `tokenizers` on a small vocabulary, and the reader's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.tokenizer import TokenizerFileError
from core.tokenizer.bpe import bytes_to_unicode
from core.tokenizer.hf import HFTokenizerError, tokenizer_from_hf

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "gpt-2": BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
}
MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "Ġ 1", "Ġ Ġ"]
TEXTS = ["the then he", " the 12 123 1 x", "a  1", "x = 12345 + 0.5\n\n\tdef f():", "naïve café ²³",
         "<|endoftext|>the<|endoftext|>"]


def hub_dir(directory: Path, *, pre: str | dict = "gpt-2", merges=MERGES, written_merges=None, model_type: str = "BPE",
            extra_vocab=()) -> Path:
    """A small tokenizer.json as the hub writes it: the 256 bytes, one token per merge numbered in the
    order of ``merges``, one special token; ``written_merges`` (default ``merges``) is the merge list stored."""
    vocab = {char: b for b, char in bytes_to_unicode().items()}
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    for token in extra_vocab:
        vocab[token] = len(vocab)
    eot = len(vocab)
    vocab["<|endoftext|>"] = eot
    doc = {
        "version": "1.0", "added_tokens": [{"id": eot, "content": "<|endoftext|>", "single_word": False,
                                            "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": PRE_TOKENIZERS[pre] if isinstance(pre, str) else pre, "post_processor": None,
        "decoder": BYTE_LEVEL,
        "model": {"type": model_type, "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [m.split(" ") for m in written_merges or merges]},
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": {"content": "<|endoftext|>"}, "chat_template": "{{ messages }}",
    }), encoding="utf-8")
    return directory


@pytest.mark.parametrize("pre", ["gpt-2", "smollm"])
def test_same_ids_as_hugging_face_tokenizers(tmp_path, pre):
    tokenizers = pytest.importorskip("tokenizers")
    folder = hub_dir(tmp_path / "tok", pre=pre)
    ours, info = tokenizer_from_hf(folder)
    reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text, allowed_special="all") == reference.encode(text).ids, text
        assert ours.decode(ours.encode(text, allowed_special="all")) == text
    assert info == {"name": "tok", "pre": pre, "bos_id": None, "eos_id": 262, "eos_token": "<|endoftext|>",
                    "chat_template": "{{ messages }}"}
    assert ours.eos_id == 262 and ours.special_tokens == {"<|endoftext|>": 262}


def test_merges_written_as_strings_read_the_same(tmp_path):
    folder = hub_dir(tmp_path / "lists")
    doc = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    doc["model"]["merges"] = [" ".join(m) for m in doc["model"]["merges"]]
    (hub_dir(tmp_path / "strings") / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    (a, _), (b, _) = tokenizer_from_hf(folder), tokenizer_from_hf(tmp_path / "strings")
    assert a.ranks == b.ranks and a.encode(TEXTS[1]) == b.encode(TEXTS[1])


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "Unigram"}, "model type 'Unigram'; only byte-level BPE"),
    ({"pre": {"type": "Metaspace", "replacement": "▁"}}, r"pre-tokenizer \[\('Metaspace', None\)\] is not one"),
    ({"extra_vocab": ["▁x"]}, "token '▁x' is not a byte-level BPE token"),
    ({"written_merges": ["h e", "Ġ t", *MERGES[2:]]}, "merge 1 'Ġ t' makes token 256, out of merge order"),
    ({"merges": ["Ġ t", "Ġt he"]}, "merge 1 'Ġt he' uses or makes a token absent from the vocabulary"),
    ({"written_merges": MERGES[:-1]}, "6 multi-byte normal tokens but 5 merges"),
])
def test_a_tokenizer_we_cannot_reproduce_is_refused(tmp_path, change, message):
    with pytest.raises(HFTokenizerError, match=message):
        tokenizer_from_hf(hub_dir(tmp_path / "tok", **change))


def test_missing_or_broken_files_name_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFTokenizerError, match="tokenizer.json is missing"):
        tokenizer_from_hf(tmp_path / "empty")
    folder = hub_dir(tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerFileError, match="tokenizer_config.json is not valid JSON"):
        tokenizer_from_hf(folder)
