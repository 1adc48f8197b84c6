"""Checkpoint specs (save_tokenizer / load_tokenizer), the Tokenizer protocol, tokenize_file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.tokenizer import (
    BPETokenizer,
    DisallowedSpecialToken,
    TiktokenTokenizer,
    Tokenizer,
    TokenizerError,
    TokenizerFileError,
    gpt2_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenize_file,
)

TEXT = "Spec round trip: I'm 42 ✓ 日本\n"


@pytest.mark.parametrize("impl", ["tiktoken", "bpe"])
def test_gpt2_is_saved_by_name(tmp_path, impl):
    spec = save_tokenizer(gpt2_tokenizer(impl), tmp_path)
    assert spec == {"type": "gpt2", "impl": impl}
    assert not (tmp_path / "tokenizer.json").exists()
    loaded = load_tokenizer(spec, tmp_path)
    assert loaded is gpt2_tokenizer(impl)
    assert json.loads(json.dumps(spec)) == spec  # goes into config.json as is


def test_gpt2_from_files_is_recognised_as_gpt2(tmp_path, gpt2_files):
    spec = save_tokenizer(BPETokenizer.from_gpt2_files(*gpt2_files), tmp_path)
    assert spec == {"type": "gpt2", "impl": "bpe"}


@pytest.mark.parametrize("impl", ["tiktoken", "bpe"])
def test_trained_tokenizer_is_written_to_tokenizer_json(tmp_path, impl):
    trained = BPETokenizer.train(TEXT * 50 + "more text for merges " * 20, vocab_size=280, name="small")
    spec = save_tokenizer(trained, tmp_path, impl=impl)
    assert spec == {"type": "bpe", "file": "tokenizer.json", "impl": impl}
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = load_tokenizer(spec, tmp_path)
    assert isinstance(loaded, TiktokenTokenizer if impl == "tiktoken" else BPETokenizer)
    assert loaded.encode(TEXT, allowed_special="all") == trained.encode(TEXT, allowed_special="all")
    assert (loaded.name, loaded.vocab_size, loaded.eos_id) == ("small", 280, 279)


def test_missing_spec_means_gpt2(tmp_path):
    assert load_tokenizer(None, tmp_path) is gpt2_tokenizer("tiktoken")
    assert load_tokenizer({"type": "gpt2"}, tmp_path) is gpt2_tokenizer("tiktoken")


def test_bad_specs_name_config_json(tmp_path):
    with pytest.raises(TokenizerError, match="config.json.*type 'sentencepiece'"):
        load_tokenizer({"type": "sentencepiece"}, tmp_path)
    with pytest.raises(TokenizerError, match="impl 'rust'"):
        load_tokenizer({"type": "gpt2", "impl": "rust"}, tmp_path)
    with pytest.raises(TokenizerFileError, match="tokenizer.json.*does not exist"):
        load_tokenizer({"type": "bpe", "file": "tokenizer.json"}, tmp_path)


def test_save_rejects_unknown_tokenizers(tmp_path):
    class Foreign:
        name = "foreign"

    with pytest.raises(TypeError, match="foreign"):
        save_tokenizer(Foreign(), tmp_path)


@pytest.mark.parametrize("tok", [gpt2_tokenizer("tiktoken"), gpt2_tokenizer("bpe")], ids=["tiktoken", "bpe"])
def test_backends_satisfy_the_protocol(tok):
    assert isinstance(tok, Tokenizer)
    assert tok.decode(tok.encode(TEXT)) == TEXT


@pytest.mark.parametrize("impl", ["tiktoken", "bpe"])
def test_tokenize_file(tmp_path, impl, reference_gpt2):
    path = tmp_path / "input.txt"
    path.write_bytes("line one\r\nline two ✓\n".encode())
    ids = tokenize_file(path, impl)
    assert ids == reference_gpt2.encode("line one\r\nline two ✓\n")  # \r\n kept, not normalised
    path.write_text("a<|endoftext|>b", encoding="utf-8")
    with pytest.raises(DisallowedSpecialToken):
        tokenize_file(path, impl)
    assert tokenize_file(path, impl, allowed_special="all") == [64, 50256, 65]


def test_tokenize_file_errors(tmp_path):
    with pytest.raises(TokenizerFileError, match="does not exist"):
        tokenize_file(tmp_path / "nope.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(TokenizerFileError, match="not UTF-8"):
        tokenize_file(bad)


def test_benchmark_runs_and_checks_agreement(tmp_path):
    path = tmp_path / "bench.txt"
    path.write_text("The benchmark text, 12 times 😀.\n" * 200, encoding="utf-8")
    script = Path(__file__).resolve().parents[3] / "bench" / "tokenizer.py"
    run = subprocess.run([sys.executable, str(script), str(path), "--repeat", "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "gpt2:" in out and "tiktoken" in out and "bpe" in out and "MB/s" in out
