"""`scratchgpt export`: a tiny checkpoint written as a Hugging Face directory and as a GGUF file that
our readers load back, and bad input as `scratchgpt export: error: ...` naming the flag, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.classifier import SequenceClassifier
from core.model import GPTModel, ModelConfig
from core.tokenizer.gpt2 import gpt2_tokenizer
from core.weights.checkpoint import save_checkpoint
from core.weights.gguf import load_gguf
from core.weights.hf import load_hf_checkpoint
from scratchgpt.cli import main

pytest.importorskip("gguf")
TINY = dict(vocab_size=50257, context_length=64, emb_dim=32, n_layers=2, n_heads=2)


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(family="llama", n_kv_heads=1, hidden_dim=64, **TINY))
    return save_checkpoint(tmp_path_factory.mktemp("cli") / "lm", model, gpt2_tokenizer())


def fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("scratchgpt export: error: "), err
    return err


def test_export_hf_and_gguf_read_back(lm_checkpoint, tmp_path, capsys):
    weights = load_file(lm_checkpoint / "model.safetensors")
    assert main(["export", "--checkpoint", str(lm_checkpoint), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    _, sd = load_hf_checkpoint(tmp_path / "hf")
    assert all(torch.equal(sd[k], weights[k]) for k in weights)
    # Again over the earlier export: it is replaced.
    assert main(["export", "--checkpoint", str(lm_checkpoint), "--format", "hf", "--out", str(tmp_path / "hf"),
                 "--outtype", "f16"]) == 0
    assert load_hf_checkpoint(tmp_path / "hf", dtype=torch.float16)[1]["tok_emb.weight"].dtype == torch.float16

    out = tmp_path / "m.gguf"
    assert main(["export", "--checkpoint", str(lm_checkpoint), "--format", "gguf", "--out", str(out),
                 "--outtype", "f32"]) == 0
    _, sd, meta = load_gguf(out)
    assert all(torch.equal(sd[k], weights[k]) for k in weights)
    assert meta["general.file_type"] == 0  # all f32


def test_bad_format_names_the_flag(lm_checkpoint, tmp_path, capsys):
    err = fails(["export", "--checkpoint", str(lm_checkpoint), "--format", "onnx", "--out", str(tmp_path / "x")], capsys)
    assert "--format" in err and "onnx" in err
    assert not (tmp_path / "x").exists()


def test_q8_0_is_for_gguf_only(lm_checkpoint, tmp_path, capsys):
    err = fails(["export", "--checkpoint", str(lm_checkpoint), "--format", "hf", "--out", str(tmp_path / "x"),
                 "--outtype", "q8_0"], capsys)
    assert "--outtype q8_0" in err
    assert not (tmp_path / "x").exists()


def test_missing_checkpoint_names_the_flag(tmp_path, capsys):
    err = fails(["export", "--checkpoint", str(tmp_path / "nope"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")],
                capsys)
    assert "--checkpoint" in err and "nope" in err
    (tmp_path / "empty").mkdir()
    err = fails(["export", "--checkpoint", str(tmp_path / "empty"), "--format", "hf", "--out", str(tmp_path / "x")], capsys)
    assert "--checkpoint" in err and "config.json is missing" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_classifier_is_refused(tmp_path, capsys):
    torch.manual_seed(1)
    clf = save_checkpoint(tmp_path / "clf", SequenceClassifier(GPTModel(ModelConfig(**TINY)), num_classes=2),
                          gpt2_tokenizer(), task="classification", labels=["ham", "spam"])
    err = fails(["export", "--checkpoint", str(clf), "--format", "hf", "--out", str(tmp_path / "x")], capsys)
    assert "--checkpoint" in err and "classification model" in err
    assert not (tmp_path / "x").exists()


def test_out_over_other_files_names_the_flag(lm_checkpoint, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep")
    err = fails(["export", "--checkpoint", str(lm_checkpoint), "--format", "gguf", "--out", str(tmp_path / "notes.txt")],
                capsys)
    assert "--out" in err and "not a GGUF file" in err
    assert (tmp_path / "notes.txt").read_text() == "keep"
