"""The `scratchgpt` command: each verb end to end on tiny real checkpoints, and bad input as
`scratchgpt VERB: error: ...` naming the flag, exit status 2, nothing written."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from core.weights.checkpoint import save_checkpoint
from core.classifier import SequenceClassifier
from core.model.config import ModelConfig
from core.model import GPTModel
from core.tokenizer.gpt2 import gpt2_tokenizer
from scratchgpt.cli import main

TINY = dict(vocab_size=50257, context_length=64, emb_dim=32, n_layers=2, n_heads=2)
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.\n" * 8


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory, tok) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("cli") / "lm", GPTModel(ModelConfig(**TINY)), tok)


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory, tok) -> Path:
    torch.manual_seed(1)
    model = SequenceClassifier(GPTModel(ModelConfig(**TINY)), num_classes=2)
    return save_checkpoint(tmp_path_factory.mktemp("cli") / "clf", model, tok, task="classification", labels=["ham", "spam"])


def fails(argv: list[str], capsys) -> str:
    """Run the command, expect the CLI's error exit, return its message."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # (Progress lines, such as the fast path a model decodes with, may come before it.)
    assert err.strip().splitlines()[-1].startswith(f"scratchgpt {argv[0]}: error: "), err
    return err


def test_generate_continues_a_prompt(lm_checkpoint, tok, capsys):
    """It prints the core's greedy continuation of the prompt, all five tokens of it."""
    from core.generation.generate import GenerationConfig, generate
    from core.weights.checkpoint import load_checkpoint

    prompt = "Every effort moves you"
    assert main(["generate", "--checkpoint", str(lm_checkpoint), "--prompt", prompt, "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    new = generate(load_checkpoint(lm_checkpoint).model, [tok.encode(prompt)], GenerationConfig(max_new_tokens=5))[0]
    assert len(new) == 5 and printed == tok.decode(new) + "\n"


def test_generate_decodes_from_gguf_blocks_with_the_dense_text(gguf_chat_checkpoint, capsys):
    argv = ["generate", "--checkpoint", str(gguf_chat_checkpoint), "--prompt", "Every effort moves you",
            "--template", "none", "--max-new-tokens", "12"]
    assert main(argv) == 0
    fast = capsys.readouterr()
    assert main(argv + ["--no-fast-kernels"]) == 0
    dense = capsys.readouterr()
    assert "fast path: gguf_blocks (9 of 9 weights, Q8_0)" in fast.err and "fast path" not in dense.err
    assert fast.out.strip() and fast.out == dense.out


def test_generate_decodes_a_dense_checkpoint_from_panels_with_the_same_text(lm_checkpoint, capsys):
    argv = ["generate", "--checkpoint", str(lm_checkpoint), "--prompt", "Every effort moves you", "--max-new-tokens", "12"]
    assert main(argv) == 0
    fast = capsys.readouterr()
    assert main(argv + ["--no-gguf-kernels"]) == 0  # the flag's old name still works
    plain = capsys.readouterr()
    if "no panels" not in fast.err:  # (where the kernel cannot be built here, the report says why)
        assert "fast path: screened_head, panels (8 linears and the output layer)" in fast.err
    assert "fast path" not in plain.err
    assert fast.out.strip() and fast.out == plain.out


def test_generate_with_a_damaged_blocks_file_decodes_densely(gguf_chat_checkpoint, tmp_path, capsys):
    import shutil

    from core.weights.gguf import BLOCKS_FILE

    damaged = shutil.copytree(gguf_chat_checkpoint, tmp_path / "damaged")
    (damaged / BLOCKS_FILE).write_bytes(b"not safetensors")
    assert main(["generate", "--checkpoint", str(damaged), "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "gguf_blocks.safetensors is damaged" in err and "decoding with torch's kernels" in err


def test_evaluate_lm_prints_loss_and_its_perplexity(lm_checkpoint, tmp_path, capsys):
    data = tmp_path / "held-out.txt"
    data.write_text(TEXT)
    assert main(["evaluate", "lm", "--checkpoint", str(lm_checkpoint), "--data", str(data)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] > 0
    assert math.isclose(report["perplexity"], math.exp(report["loss"]), rel_tol=1e-6)
    assert report["loss"] > math.log(50257) - 1.0  # random weights: near the uniform loss


def test_classify_prints_a_label_and_probabilities_per_text(classifier_checkpoint, capsys):
    texts = ["WINNER!! claim your prize now", "see you at lunch"]
    assert main(["classify", "--checkpoint", str(classifier_checkpoint), *texts]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in results] == texts
    for r in results:
        assert r["label"] in ("ham", "spam")
        assert math.isclose(sum(r["probabilities"].values()), 1.0, rel_tol=1e-5)


def test_a_missing_checkpoint_names_the_flag(tmp_path, capsys):
    err = fails(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"], capsys)
    assert "--checkpoint" in err and "nope" in err


def test_a_classifier_is_refused_by_generate(classifier_checkpoint, capsys):
    err = fails(["generate", "--checkpoint", str(classifier_checkpoint), "--prompt", "hi"], capsys)
    assert "scratchgpt classify" in err


def test_a_language_model_is_refused_by_classify(lm_checkpoint, capsys):
    assert "not a classifier" in fails(["classify", "--checkpoint", str(lm_checkpoint), "hello"], capsys)


def test_a_prompt_longer_than_the_context_is_refused(lm_checkpoint, capsys):
    err = fails(["generate", "--checkpoint", str(lm_checkpoint), "--prompt", "word " * 200, "--max-new-tokens", "4"], capsys)
    assert "context" in err


def test_tokenize_names_a_missing_file(tmp_path, capsys):
    assert "--file" in fails(["tokenize", "--file", str(tmp_path / "absent.txt")], capsys)


def test_download_from_tf_dir_without_tensorflow_names_the_flag_and_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as on a machine without the optional extra
    (tmp_path / "124M").mkdir()
    (tmp_path / "124M" / "hparams.json").write_text(
        json.dumps({"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}))
    err = fails(["download", "gpt2", "--size", "124M", "--from-tf-dir", str(tmp_path / "124M")], capsys)
    assert "--from-tf-dir" in err and "pip install -e '.[tensorflow]'" in err
    assert not (tmp_path / "home" / "models").exists()


def test_pretrain_refuses_an_empty_data_file_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    run_dir = tmp_path / "run"
    err = fails(["pretrain", "--data", str(empty), "--n-layers", "1", "--emb-dim", "16", "--n-heads", "2",
                 "--context-length", "16", "--run-dir", str(run_dir), "--no-progress"], capsys)
    assert "empty.txt" in err
    assert not run_dir.exists()


def test_pretrain_refuses_data_shorter_than_one_window(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    err = fails(["pretrain", "--data", str(short), "--n-layers", "1", "--emb-dim", "16", "--n-heads", "2",
                 "--context-length", "64", "--run-dir", str(tmp_path / "run"), "--no-progress"], capsys)
    assert "short.txt" in err or "window" in err


def test_a_config_file_with_an_unknown_key_names_it(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("lr: 0.001\nlearning_rat: 0.1\n")
    err = fails(["pretrain", "--config", str(config)], capsys)
    assert "learning_rat" in err


def test_resume_from_a_directory_that_is_not_a_run_changes_nothing(tmp_path, capsys):
    not_a_run = tmp_path / "photos"
    not_a_run.mkdir()
    (not_a_run / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    fails(["pretrain", "--resume", str(not_a_run), "--no-progress"], capsys)
    assert sorted(p.name for p in not_a_run.iterdir()) == ["cat.jpg"]


def test_a_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--batch-size", "many"])
    assert exc.value.code == 2
    assert "--batch-size: expected an integer, got 'many'" in capsys.readouterr().err


def test_chat_answers_each_turn_and_the_next_turn_reuses_the_last_ones_cache(tmp_path, tok, capsys, monkeypatch):
    import core.fast.prefix_cache
    from core.generation.chat_template import ALPACA

    torch.manual_seed(2)
    model = GPTModel(ModelConfig(**{**TINY, "context_length": 256}))
    checkpoint = save_checkpoint(tmp_path / "chat", model, tok, chat_template=ALPACA)
    stores = []

    class Recording(core.fast.prefix_cache.PrefixCache):
        def __init__(self, max_bytes: int = 2**30) -> None:
            super().__init__(max_bytes if keep else 0)
            stores.append(self)

    transcripts = {}
    for keep in (False, True):
        lines = iter(["Name a colour.", "And another one?", ""])
        monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
        monkeypatch.setattr(core.fast.prefix_cache, "PrefixCache", Recording)
        assert main(["chat", "--checkpoint", str(checkpoint), "--max-new-tokens", "12"]) == 0
        transcripts[keep] = capsys.readouterr().out
    assert transcripts[True] == transcripts[False] and transcripts[True].count("\n") >= 2
    assert stores[0].reused_tokens == 0 and stores[1].reused_tokens > 20  # the first turn's prompt, at least
