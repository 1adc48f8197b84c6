"""GPT-2's tokenizer: both backends give tiktoken's ids, byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from core.tokenizer import DisallowedSpecialToken, UnknownTokenId, gpt2_tokenizer
from core.tokenizer.bpe import BPETokenizer
from core.tokenizer.gpt2 import (
    GPT2_EOT_ID,
    GPT2_RANKS_FILE,
    GPT2_RANKS_SHA256,
    RankFileChecksumError,
    gpt2_ranks,
    load_tiktoken_ranks,
)
from core.tokenizer.errors import TokenizerFileError

SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
IMPLS = ["tiktoken", "bpe"]
BIG_FILE_PREFIX = 200_000  # characters compared per shared text file, to keep the test fast


def shared_text_files() -> list[Path]:
    folder = SHARED_DATA / "text"
    return sorted(folder.rglob("*.txt")) if folder.is_dir() else []


def test_vendored_rank_file_is_gpt2s():
    assert hashlib.sha256(GPT2_RANKS_FILE.read_bytes()).hexdigest() == GPT2_RANKS_SHA256
    ranks = gpt2_ranks()
    assert len(ranks) == 50256 and sorted(ranks.values()) == list(range(50256))


@pytest.mark.parametrize("impl", IMPLS)
def test_basic_ids(impl):
    tok = gpt2_tokenizer(impl)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eos_id == GPT2_EOT_ID == 50256 and tok.bos_id is None
    assert tok.special_tokens == {"<|endoftext|>": 50256}
    assert tok.token_bytes(995) == b" world" and tok.token_bytes(50256) == b"<|endoftext|>"


@pytest.mark.parametrize("impl", IMPLS)
def test_varied_texts_match_tiktoken(impl, reference_gpt2, varied_texts):
    tok = gpt2_tokenizer(impl)
    for text in varied_texts:
        assert tok.encode(text) == reference_gpt2.encode(text), text
        assert tok.decode(tok.encode(text)) == text


def test_from_gpt2_files_matches_tiktoken(gpt2_files, reference_gpt2, varied_texts):
    tok = BPETokenizer.from_gpt2_files(*gpt2_files)
    assert tok.ranks == gpt2_ranks()
    assert tok.special_tokens == {"<|endoftext|>": 50256}
    for text in varied_texts:
        assert tok.encode(text) == reference_gpt2.encode(text), text


@pytest.mark.parametrize("path", shared_text_files(), ids=lambda p: p.name)
def test_shared_text_files_match_tiktoken(path, reference_gpt2):
    text = path.read_bytes().decode("utf-8")[:BIG_FILE_PREFIX]
    expected = reference_gpt2.encode(text)
    for impl in IMPLS:
        assert gpt2_tokenizer(impl).encode(text) == expected, impl
    assert gpt2_tokenizer("bpe").decode(expected) == text


def test_shared_text_files_are_there_to_compare(shared_data):
    """Where ../shared/data is, its text files feed the comparison above: an empty parameter list
    would leave that test nothing to compare and only a skip to show for it."""
    files = shared_text_files()
    assert files, f"no .txt files under {shared_data / 'text'}"
    assert all(f.stat().st_size > 0 for f in files)


@pytest.mark.parametrize("impl", IMPLS)
def test_special_tokens_allowed_and_disallowed(impl, reference_gpt2):
    tok = gpt2_tokenizer(impl)
    text = "a<|endoftext|>b <|endoftext|><|endoftext|>\n"
    with pytest.raises(DisallowedSpecialToken, match="<\\|endoftext\\|>") as info:
        tok.encode(text)
    assert isinstance(info.value, ValueError)
    with pytest.raises(DisallowedSpecialToken):
        tok.encode(text, allowed_special=set())
    expected = reference_gpt2.encode(text, allowed_special="all")
    assert expected.count(50256) == 3
    assert tok.encode(text, allowed_special="all") == expected
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == expected
    assert tok.decode(expected) == text
    # A near miss is ordinary text and needs no permission.
    assert tok.encode("<|endoftext|") == reference_gpt2.encode("<|endoftext|")


@pytest.mark.parametrize("impl", IMPLS)
def test_allowed_special_rejects_a_bare_string(impl):
    with pytest.raises(TypeError, match="did you mean"):
        gpt2_tokenizer(impl).encode("x", allowed_special="<|endoftext|>")


@pytest.mark.parametrize(
    "text",
    ["\ud800", "a\udfffb", "x\ud83d\ude00y", "\ud83d", "\ude00\ud83d", "<\ud800|endoftext|>", "é\udc80\udc81"],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_surrogates_are_repaired_like_tiktoken(impl, text, reference_gpt2):
    """Pairs join into their character, lone surrogates become U+FFFD (tiktoken's rule)."""
    tok = gpt2_tokenizer(impl)
    ids = tok.encode(text)
    assert ids == reference_gpt2.encode(text)
    repaired = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert tok.decode(ids) == repaired


def test_surrogate_pair_equals_the_character():
    tok = gpt2_tokenizer("bpe")
    assert tok.encode("x\ud83d\ude00y") == tok.encode("x😀y")
    assert tok.encode("\ud800") == tok.encode("\ufffd")


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_errors_and_partial_utf8(impl):
    tok = gpt2_tokenizer(impl)
    ids = tok.encode("😀")
    assert ids == [47249, 222]
    assert tok.decode_bytes(ids[:1]) == b"\xf0\x9f\x98"  # three of the emoji's four bytes
    assert tok.decode(ids[:1]) == "\ufffd" and tok.decode(ids) == "😀"
    for bad in (50257, -1, 10**12):
        with pytest.raises(UnknownTokenId, match=str(bad)):
            tok.decode([1, bad])
        with pytest.raises(UnknownTokenId):
            tok.token_bytes(bad)


def test_decode_accepts_arrays():
    np = pytest.importorskip("numpy")
    ids = gpt2_tokenizer("bpe").encode("array of ids")
    for impl in IMPLS:
        assert gpt2_tokenizer(impl).decode(np.array(ids)) == "array of ids"


def test_checksum_mismatch_is_a_clear_error(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    data = bytearray(GPT2_RANKS_FILE.read_bytes())
    data[:4] = b"IR=="  # change the first token's bytes
    bad.write_bytes(bytes(data))
    with pytest.raises(RankFileChecksumError, match="sha256") as info:
        load_tiktoken_ranks(bad, GPT2_RANKS_SHA256)
    assert str(bad) in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(TokenizerFileError, match="does not exist"):
        load_tiktoken_ranks(tmp_path / "missing.tiktoken", GPT2_RANKS_SHA256)
    garbage = tmp_path / "garbage.tiktoken"
    garbage.write_bytes(b"not base64!! 1\n")
    with pytest.raises(TokenizerFileError, match="garbage.tiktoken:1"):
        load_tiktoken_ranks(garbage)


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        gpt2_tokenizer("sentencepiece")
