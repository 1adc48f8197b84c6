"""`scratchgpt serve`'s setup step: a missing classifier whose data cannot be had leaves the chat serving."""

from __future__ import annotations

from pathlib import Path

import torch

import core.weights.fetch
from core.weights.checkpoint import save_checkpoint
from core.model.config import ModelConfig
from core.model import GPTModel
from core.tokenizer.gpt2 import gpt2_tokenizer
from scratchgpt import serve


def offline(name: str):
    raise core.weights.fetch.DownloadError(f"could not download {name}: offline (test)")


def test_offline_without_spam_data_serves_chat_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCRATCHGPT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(serve, "SHARED_SPAM", tmp_path / "no-shared-data")
    monkeypatch.setattr(core.weights.fetch, "download_dataset", offline)
    torch.manual_seed(0)
    base = save_checkpoint(tmp_path / "base", GPTModel(ModelConfig(vocab_size=50257, context_length=32, emb_dim=16,
                                                                  n_layers=1, n_heads=2)), gpt2_tokenizer())
    assert serve.ensure_classifier(None, base, None) is None
    err = capsys.readouterr().err
    assert "--spam-data FILE" in err and "serving without the spam classifier" in err
    assert not (tmp_path / "home" / "models" / serve.CLASSIFIER_NAME).exists()  # nothing half-written


def test_a_chosen_classifier_is_used_as_given(tmp_path):
    assert serve.ensure_classifier(str(tmp_path / "mine"), Path("unused"), None) == tmp_path / "mine"
