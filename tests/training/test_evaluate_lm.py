"""training.evaluate_lm: token-weighted loss and perplexity of any causal-LM checkpoint."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.weights.checkpoint import save_checkpoint
from core.model.config import ModelConfig
from core.data import DataError, write_token_file
from core.model import GPTModel
from core.tokenizer.gpt2 import gpt2_tokenizer
from training.evaluate_lm import EvaluateLMConfig, evaluate_lm, run_evaluate_lm

WORDS = "the cat sat on a mat while dogs ran in the park and birds sang songs of morning light".split()


def make_checkpoint(path: Path, family: str = "gpt2", context: int = 128) -> GPTModel:
    torch.manual_seed(0)
    extra = {"n_kv_heads": 1, "hidden_dim": 48} if family == "llama" else {}
    cfg = ModelConfig(family=family, vocab_size=50257, context_length=context, emb_dim=32, n_layers=2, n_heads=2, **extra)
    model = GPTModel(cfg).eval()
    save_checkpoint(path, model, gpt2_tokenizer("tiktoken"))
    return model


def write_text(path: Path, n_words: int) -> str:
    rng = random.Random(2)
    text = " ".join(rng.choice(WORDS) for _ in range(n_words))
    path.write_text(text)
    return text


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_window_equals_direct_cross_entropy(tmp_path: Path, family: str) -> None:
    model = make_checkpoint(tmp_path / "ckpt", family)
    text = write_text(tmp_path / "t.txt", 40)
    ids = torch.tensor(gpt2_tokenizer("tiktoken").encode(text))
    assert len(ids) <= 128
    with torch.no_grad():
        expected = F.cross_entropy(model(ids[None, :-1])[0], ids[1:]).item()
    result = evaluate_lm(tmp_path / "ckpt", tmp_path / "t.txt", device="cpu")
    assert result["tokens"] == len(ids) - 1
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_many_windows_weight_every_token_once(tmp_path: Path) -> None:
    model = make_checkpoint(tmp_path / "ckpt", context=16)
    text = write_text(tmp_path / "t.txt", 150)
    ids = torch.tensor(gpt2_tokenizer("tiktoken").encode(text))
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 16):  # consecutive windows, the last one shorter
            chunk = ids[s : s + 17]
            total += F.cross_entropy(model(chunk[None, :-1])[0], chunk[1:], reduction="sum").item()
    result = evaluate_lm(tmp_path / "ckpt", tmp_path / "t.txt", batch_size=3, device="cpu")
    assert result["tokens"] == len(ids) - 1 and (len(ids) - 1) % 16 != 0  # a partial last window is covered
    assert result["loss"] == pytest.approx(total / (len(ids) - 1), rel=1e-5)


def test_token_file_gives_the_same_numbers_as_its_text(tmp_path: Path, capsys) -> None:
    make_checkpoint(tmp_path / "ckpt", context=16)
    text = write_text(tmp_path / "t.txt", 100)
    tok = gpt2_tokenizer("tiktoken")
    write_token_file(tmp_path / "t.bin", np.asarray(tok.encode(text)), {"tokenizer": "gpt2", "vocab_size": 50257})
    from_text = evaluate_lm(tmp_path / "ckpt", tmp_path / "t.txt", device="cpu")
    printed = run_evaluate_lm(EvaluateLMConfig(checkpoint=tmp_path / "ckpt", data=tmp_path / "t.bin", device="cpu"))
    assert json.loads(capsys.readouterr().out)["loss"] == printed["loss"]
    assert (printed["tokens"], printed["loss"]) == (from_text["tokens"], pytest.approx(from_text["loss"], rel=1e-6))


def test_bad_data(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "ckpt")
    write_token_file(tmp_path / "other.bin", np.arange(10), {"tokenizer": "smollm2", "vocab_size": 49152})
    with pytest.raises(DataError, match="49152-token vocabulary"):
        evaluate_lm(tmp_path / "ckpt", tmp_path / "other.bin", device="cpu")
    (tmp_path / "one.txt").write_text("the")
    with pytest.raises(DataError, match="at least 2"):
        evaluate_lm(tmp_path / "ckpt", tmp_path / "one.txt", device="cpu")
    with pytest.raises(DataError, match="no such file"):
        evaluate_lm(tmp_path / "ckpt", tmp_path / "missing.txt", device="cpu")
