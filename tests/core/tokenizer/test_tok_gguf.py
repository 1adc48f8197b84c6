"""The tokenizer inside a GGUF file: SmolLM2 against its reference pre-tokenizer, and the reader's errors."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.tokenizer import BPETokenizer, TiktokenTokenizer, UnrepresentableBytes, load_tokenizer, save_tokenizer
from core.tokenizer.bpe import bytes_to_unicode
from core.tokenizer.gguf import (
    DEFAULT_GGUF_IMPL,
    SMOLLM_PATTERN,
    GGUFTokenizerError,
    read_gguf_metadata,
    tokenizer_from_gguf,
)

SHARED_TEXT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "text"

# Where SmolLM2's digit rule matters: digits after whitespace runs, non-ASCII numerals, code.
DIGIT_TEXTS = [
    "a  1", " ²", "x 12345 y", "  123\t\t456\n\n789 ", "1,000,000.50 and -3.5e10", "version 2.0.1-rc3",
    "Ⅻ ⅷ ½¾ ٣٤ ௫ ໒ 𝟙𝟚 ①② ⁴", "for i in range(10):\n    x = arr[i] * 2**8 + 0xFF\n",
    "\t\t12\n   \n  7", "tel: +44 (0)20 7946 0958", "CJK 第3章 2024年1月31日 한국어 3개",
    "emoji 4️⃣ 🔟 😀1😀", "'s 's1 I'll 99'll",
]


@functools.lru_cache(maxsize=4)
def smollm2(path: Path, impl: str):
    return tokenizer_from_gguf(path, impl)


@pytest.fixture()
def smollm2_meta(smollm2_gguf_path):
    return _read_metadata(smollm2_gguf_path)


@functools.lru_cache(maxsize=2)
def _read_metadata(path: Path) -> dict:
    return read_gguf_metadata(path)


def hf_reference(meta: dict):
    """SmolLM2's own pre-tokenizer over the GGUF vocabulary, built with HF `tokenizers`.

    (transformers' GGUF loader is wrong here: it forgets the digit split.)
    """
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, models, pre_tokenizers

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    hf = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    hf.add_special_tokens([AddedToken(t, special=True) for t, kind in zip(tokens, types) if kind == 3])
    return hf


_HF_CACHE: dict[int, object] = {}


def hf_reference_cached(meta: dict):
    key = len(meta["tokenizer.ggml.tokens"])
    if key not in _HF_CACHE:
        _HF_CACHE[key] = hf_reference(meta)
    return _HF_CACHE[key]


def test_metadata_and_layout(smollm2_gguf_path):
    tok, meta = tokenizer_from_gguf(smollm2_gguf_path)
    assert isinstance(tok, TiktokenTokenizer if DEFAULT_GGUF_IMPL == "tiktoken" else BPETokenizer)
    assert (meta["model"], meta["pre"], meta["vocab_size"]) == ("gpt2", "smollm", 49152)
    assert (meta["bos_id"], meta["eos_id"], meta["unk_id"], meta["pad_id"]) == (1, 2, 0, 2)
    assert meta["add_bos_token"] is False
    assert meta["chat_template"].startswith("{% for message in messages %}") and len(meta["chat_template"]) == 368
    assert meta["absent_bytes"] == [0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)]
    assert tok.vocab_size == 49152 and tok.eos_id == 2 and tok.bos_id == 1
    assert len(tok.special_tokens) == 17
    assert tok.special_tokens["<|im_start|>"] == 1 and tok.special_tokens["<|im_end|>"] == 2
    assert tok.special_tokens["<|endoftext|>"] == 0
    assert len(tok.ranks) == 256 - 21 + 48900


def test_chat_prompt_ids(smollm2_gguf_path):
    """The prompt from the verified recipe (docs/recipes-smollm2-gguf.md, section 2)."""
    prompt = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    expected = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
                19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    for impl in ("tiktoken", "bpe"):
        tok, _ = smollm2(smollm2_gguf_path, impl)
        assert tok.encode(prompt, allowed_special="all") == expected
        assert tok.decode(expected) == prompt
    assert tok.decode([504, 3575, 282, 4649, 314, 7042, 30, 2]) == "The capital of France is Paris.<|im_end|>"


def test_matches_the_reference_pretokenizer(smollm2_gguf_path, smollm2_meta, varied_texts):
    hf = hf_reference(smollm2_meta)
    texts = [t for t in varied_texts if "\U000e0080" not in t] + DIGIT_TEXTS
    for impl in ("tiktoken", "bpe"):
        tok, _ = smollm2(smollm2_gguf_path, impl)
        for text in texts:
            assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, (impl, text)
        special = "<|im_start|>user\n12 apples<|im_end|>\n"
        assert tok.encode(special, allowed_special="all") == hf.encode(special, add_special_tokens=False).ids


assigned_text = st.text(alphabet=st.characters(exclude_categories=("Cs", "Cn")), max_size=120)
digit_heavy_text = st.lists(
    st.sampled_from(["1", "23", " 4", "  ", "\t", "\n", "a", "'s", "x1", "²", "٣", "Ⅻ", "!", "日", "😀", " "]), max_size=30
).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(assigned_text, digit_heavy_text))
def test_random_text_matches_the_reference(smollm2_gguf_path, smollm2_meta, text):
    hf = hf_reference_cached(smollm2_meta)
    expected = hf.encode(text, add_special_tokens=False).ids
    for impl in ("tiktoken", "bpe"):
        assert smollm2(smollm2_gguf_path, impl)[0].encode(text) == expected, impl


def test_absent_bytes_are_dropped_like_the_reference(smollm2_gguf_path, smollm2_meta):
    hf = hf_reference(smollm2_meta)
    for text in ["\x13", "a\x13b", "!\x13!", "x\x04\x06y 1\x1d2", "\U00040000 plane 4"]:
        expected = hf.encode(text, add_special_tokens=False).ids
        for impl in ("tiktoken", "bpe"):
            assert smollm2(smollm2_gguf_path, impl)[0].encode(text) == expected, (impl, text)
    strict, _ = tokenizer_from_gguf(smollm2_gguf_path, "bpe", unknown_bytes="error")
    with pytest.raises(UnrepresentableBytes, match="0x13"):
        strict.encode("a\x13b")


def test_tiktoken_and_bpe_agree(smollm2_gguf_path, varied_texts):
    """Same ids from both backends on the fixture and on real text (their speeds: bench/tokenizer.py --gguf)."""
    fast, meta = smollm2(smollm2_gguf_path, "tiktoken")
    ours, _ = smollm2(smollm2_gguf_path, "bpe")
    absent = set(meta["absent_bytes"])
    for text in varied_texts + DIGIT_TEXTS:
        assert fast.encode(text) == ours.encode(text), text
        representable = "".join(c for c in text if not set(c.encode()) & absent)
        assert ours.decode(ours.encode(text)) == representable
    files = sorted(SHARED_TEXT.rglob("*.txt")) if SHARED_TEXT.is_dir() else []
    if not files:
        pytest.skip("../shared/data/text is not present")
    text = "".join(f.read_text(encoding="utf-8")[:100_000] for f in files)
    assert fast.encode(text) == ours.encode(text)


def tiktoken_cuts_like(pattern: str, text: str, pieces: list[str]) -> bool:
    """Whether tiktoken's Rust regex cuts ``text`` into ``pieces``.

    The vocabulary is the single bytes, each piece, and each two neighbouring
    pieces joined: tiktoken returns one token per piece exactly when its own
    pieces are these (a piece of its own spanning two of ours would come back
    as the joined token or as bytes).
    """
    import tiktoken

    ranks = {bytes((b,)): b for b in range(256)}
    for joined in [p.encode() for p in pieces] + [(a + b).encode() for a, b in zip(pieces, pieces[1:])]:
        ranks.setdefault(joined, len(ranks))
    probe = tiktoken.Encoding("cuts", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return probe.encode_ordinary(text) == [ranks[p.encode()] for p in pieces]


def test_regex_module_pattern_gives_the_reference_pieces(varied_texts):
    """SMOLLM_PATTERN in the `regex` module cuts like HF's Digits+ByteLevel and like tiktoken."""
    tokenizers = pytest.importorskip("tokenizers")
    reference = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.Digits(individual_digits=True),
         tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    byte_of = {char: b for b, char in bytes_to_unicode().items()}
    ours = BPETokenizer({bytes((b,)): b for b in range(256)}, SMOLLM_PATTERN)
    for text in [t for t in varied_texts if "\U000e0080" not in t] + DIGIT_TEXTS:
        pieces = ours.pretokenize(text)
        hf_pieces = [bytes(byte_of[c] for c in piece).decode() for piece, _ in reference.pre_tokenize_str(text)]
        assert pieces == hf_pieces, text
        assert tiktoken_cuts_like(SMOLLM_PATTERN, text, pieces), text
    assert ours.pretokenize("a  1 22") == ["a", "  ", "1", " ", "2", "2"]
    assert ours.pretokenize("x   \n\n 7") == ["x", "   \n\n ", "7"]
    assert not tiktoken_cuts_like(SMOLLM_PATTERN, "a  1", ["a", " ", " ", "1"])  # the probe notices a wrong cut


def test_save_as_tokenizer_json_no_gguf_needed(smollm2_gguf_path, tmp_path):
    tok, _ = smollm2(smollm2_gguf_path, "tiktoken")
    spec = save_tokenizer(tok, tmp_path)
    assert spec == {"type": "bpe", "file": "tokenizer.json", "impl": "tiktoken"}
    for impl in ("tiktoken", "bpe"):
        loaded = load_tokenizer({**spec, "impl": impl}, tmp_path)
        text = "<|im_start|>user\nHi 123 \x13!<|im_end|>"
        assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
        assert (loaded.eos_id, loaded.bos_id, loaded.vocab_size, loaded.unknown_bytes) == (2, 1, 49152, "drop")


def test_fast_reader_equals_gguf_package(smollm2_gguf_path):
    gguf = pytest.importorskip("gguf")
    fast = read_gguf_metadata(smollm2_gguf_path)
    reader = gguf.GGUFReader(smollm2_gguf_path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "general.name"):
        assert fast[key] == reader.fields[key].contents(), key
    assert list(fast["tokenizer.ggml.token_type"]) == reader.fields["tokenizer.ggml.token_type"].contents()
    assert "general.languages" not in fast  # arrays outside tokenizer.* are skipped
    from_reader, meta = tokenizer_from_gguf(reader, "bpe")
    assert meta == smollm2(smollm2_gguf_path, "bpe")[1]
    assert from_reader.encode("x 12 y") == smollm2(smollm2_gguf_path, "bpe")[0].encode("x 12 y")


# ---------------------------------------------------------------------------
# Small GGUF files written here: the reader's and builder's errors, no fixture needed
# ---------------------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_gguf(path: Path, *, model="gpt2", pre="smollm", merges=("a b", "ab c"), extra_tokens=(), types=None):
    gguf = pytest.importorskip("gguf")
    to_text = bytes_to_unicode()
    tokens = SPECIALS + [to_text[b] for b in range(256)] + ["ab", "abc", *extra_tokens]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types or [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(list(merges))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{{ messages }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_small_gguf_builds(tmp_path):
    path = write_gguf(tmp_path / "toy.gguf")
    for impl in ("tiktoken", "bpe"):
        tok, meta = tokenizer_from_gguf(path, impl)
        assert tok.encode("abc ab 12") == [3 + 256 + 1, 3 + ord(" "), 3 + 256, 3 + ord(" "), 3 + ord("1"), 3 + ord("2")]
        assert tok.encode("<|im_end|>", allowed_special="all") == [2]
        assert meta["chat_template"] == "{{ messages }}" and meta["eos_id"] == 2 and meta["absent_bytes"] == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "llama"}, "only byte-level BPE"),
        ({"pre": "qwen2"}, "pre-tokenizer.*'qwen2'"),
        ({"merges": ("ab c", "a b")}, "out of merge order"),
        ({"merges": ("a b",)}, "multi-byte normal tokens but 1 merges"),
        ({"merges": ("a b", "ab c", "x y")}, "absent from the vocabulary"),
        ({"types": [3] * 3 + [1] * 256 + [6, 1]}, "has type 6"),
    ],
)
def test_small_gguf_errors(tmp_path, kwargs, message):
    path = write_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(GGUFTokenizerError, match=message):
        tokenizer_from_gguf(path)


def test_not_a_gguf_file(tmp_path):
    with pytest.raises(GGUFTokenizerError, match="does not exist"):
        read_gguf_metadata(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(GGUFTokenizerError, match="not a GGUF file"):
        read_gguf_metadata(junk)
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good[:200])
    with pytest.raises(GGUFTokenizerError, match="truncated"):
        read_gguf_metadata(truncated)


def test_merges_recovered_from_ranks_are_the_files_merges(smollm2_gguf_path, smollm2_meta):
    """What the exports write (core.tokenizer.export) for SmolLM2: its own 48,900 merges, in order."""
    from core.tokenizer.bpe import merges_from_ranks

    tok, _ = smollm2(smollm2_gguf_path, "tiktoken")
    spell = bytes_to_unicode()
    merges = ["".join(spell[b] for b in a) + " " + "".join(spell[b] for b in b_) for a, b_ in merges_from_ranks(tok.ranks)]
    assert merges == list(smollm2_meta["tokenizer.ggml.merges"])
