"""The spam fine-tune on tiny models: the last-real-token rule, the activation cache, the job end to end."""

import json
import random
from pathlib import Path

import pytest
import torch

from core.weights.checkpoint import load_checkpoint, save_checkpoint
from core.model.config import ModelConfig
from core.model import GPTModel
from core.tokenizer.gpt2 import gpt2_tokenizer
from training.base_model import BaseModelError
from training.finetune_spam import (
    SpamConfig, SpamInputs, average_states, build_classifier, classify_texts, finetune_spam,
)
from training.evaluate_spam import evaluate_spam
from training.spam_data import SpamDataError


def tiny_backbone(family: str = "gpt2", n_layers: int = 3) -> GPTModel:
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=50257, context_length=64, emb_dim=16, n_layers=n_layers, n_heads=2,
                      hidden_dim=32, qkv_bias=family == "gpt2")
    return GPTModel(cfg).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padding_does_not_move_the_last_real_token(family):
    model = build_classifier(tiny_backbone(family), trainable_blocks=1).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    alone = model(ids, torch.tensor([4]))
    for pad in (0, 50256, 999):
        padded = torch.tensor([[5, 6, 7, 8, pad, pad, pad]])
        torch.testing.assert_close(model(padded, torch.tensor([4])), alone, rtol=1e-5, atol=1e-6)
    # Reading the last position instead (the rule broken) gives something else.
    assert not torch.allclose(model(torch.tensor([[5, 6, 7, 8, 0, 0, 0]]), None), alone, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_prefix_gives_the_uncached_logits_and_gradients(family):
    tok = gpt2_tokenizer()
    texts = ["Free entry in 2 a wkly comp to win FA Cup final tkts", "ok", "See you at the station at 6, bring the tickets"]
    encoded = [tok.encode(t) for t in texts]
    model = build_classifier(tiny_backbone(family, n_layers=3), trainable_blocks=1)
    plain = SpamInputs(model, encoded, [1, 0, 0], tok.eos_id, start_block=None)
    cached = SpamInputs(model, encoded, [1, 0, 0], tok.eos_id, start_block=2)
    rows = [0, 1, 2]  # different lengths: the short rows are padded in both paths
    model.train()
    grads = []
    for inputs in (plain, cached):
        model.zero_grad()
        logits = inputs.logits(rows)
        torch.nn.functional.cross_entropy(logits, inputs.labels[rows]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        inputs.last_logits = logits.detach()
    torch.testing.assert_close(cached.last_logits, plain.last_logits, rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_only_last_blocks_norm_and_head_train():
    model = build_classifier(tiny_backbone(n_layers=3), trainable_blocks=2)
    trainable = {n.split(".")[1] if n.startswith("backbone.") else n.split(".")[0]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks", "final_norm", "head"}
    blocks = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and ".blocks." in n}
    assert blocks == {"1", "2"}
    with pytest.raises(ValueError, match="--trainable-blocks 4 exceeds the base's 3 blocks"):
        build_classifier(tiny_backbone(n_layers=3), trainable_blocks=4)


# -- the job end to end ---------------------------------------------------------------------


def write_spam(path: Path, n_ham: int = 40, n_spam: int = 30) -> Path:
    ham = ["see you at lunch", "ok call me later", "are we still on for dinner", "i am running late sorry"]
    spam = ["WINNER! claim your FREE prize now, txt WIN to 80086", "URGENT! you have won a cash award, call 0906"]
    lines = [f"ham\t{ham[i % len(ham)]} {i}" for i in range(n_ham)] + [f"spam\t{spam[i % 2]} {i}" for i in range(n_spam)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_base(tmp_path) -> Path:
    return save_checkpoint(tmp_path / "base", tiny_backbone(n_layers=3), gpt2_tokenizer())


def test_finetune_writes_a_loadable_classifier_metrics_and_plots(tmp_path, tiny_base):
    data = write_spam(tmp_path / "sms")
    out = finetune_spam(SpamConfig(base=str(tiny_base), data=data, out=tmp_path / "spam", epochs=2, lr=1e-3,
                                   trainable_blocks=1, device="cpu"))
    ckpt = load_checkpoint(out)
    assert ckpt.task == "classification" and ckpt.labels == ["ham", "spam"]
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("train", "val", "test"):
        assert {"accuracy", "precision", "recall", "f1", "confusion_matrix"} <= set(metrics[split])
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == metrics["sizes"]["test"] == 12
    assert len(metrics["data"]["sha256"]) == 64 and len(metrics["base"]["sha256"]) == 64
    assert metrics["activation_cache"] is True and metrics["wall_time_s"] > 0
    assert (out / "loss.png").stat().st_size > 1000 and (out / "accuracy.png").stat().st_size > 1000

    # The service's view: the saved model classifies as the trained one did.
    result = evaluate_spam(out, data, device="cpu")
    assert result["n"] == 70
    assert set(result) == {"accuracy", "precision", "recall", "f1", "n", "confusion_matrix", "threshold"}
    assert result["threshold"] == ckpt.metadata.get("threshold")
    labelled = classify_texts(out, ["WINNER! claim your FREE prize", "see you at lunch"], device="cpu")
    assert [r["label"] in ("ham", "spam") for r in labelled] == [True, True]
    assert 0.0 <= labelled[0]["spam_probability"] <= 1.0


HAM_WORDS = "see you at lunch ok dinner tonight thanks".split()
SPAM_WORDS = "WINNER claim FREE prize cash URGENT txt bonus".split()


def separable_messages(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` ham and ``n`` spam messages drawn from two vocabularies that share no word."""
    rng = random.Random(seed)
    draw = lambda words: " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))  # noqa: E731
    return [pair for _ in range(n) for pair in (("ham", draw(HAM_WORDS)), ("spam", draw(SPAM_WORDS)))]


def separable_setup(tmp_path) -> tuple[Path, Path]:
    """A random 2-block base (64 wide) and an SMS file of 60 + 60 separable messages."""
    torch.manual_seed(0)
    backbone = GPTModel(ModelConfig(vocab_size=50257, context_length=64, emb_dim=64, n_layers=2, n_heads=4)).eval()
    base = save_checkpoint(tmp_path / "base", backbone, gpt2_tokenizer())
    data = tmp_path / "sms"
    data.write_text("".join(f"{label}\t{text}\n" for label, text in separable_messages(60, seed=0)), encoding="utf-8")
    return base, data


def test_finetune_learns_a_separable_set_in_a_few_steps(tmp_path):
    """On messages whose words tell the class, a few optimizer steps take a random base from chance
    (0.5: the splits are balanced) to high accuracy on messages it never saw."""
    base, data = separable_setup(tmp_path)
    out = finetune_spam(SpamConfig(base=str(base), data=data, out=tmp_path / "spam", epochs=2, lr=1e-3,
                                   trainable_blocks=2, device="cpu"))
    metrics = json.loads((out / "metrics.json").read_text())
    steps = metrics["history"]["step_loss"]
    assert metrics["sizes"]["train"] == 84 and len(steps) == 2 * 11  # 84 messages, 8 a step, 2 epochs
    assert sum(steps[-5:]) < sum(steps[:5]) / 4
    assert metrics["train"]["accuracy"] >= 0.95 and metrics["test"]["accuracy"] >= 0.9
    # The saved classifier, on messages drawn afresh.
    fresh = separable_messages(20, seed=1)
    labelled = classify_texts(out, [text for _, text in fresh], device="cpu")
    assert sum(r["label"] == label for r, (label, _) in zip(labelled, fresh)) >= 0.9 * len(fresh)


def test_average_seeds_and_the_validation_threshold_end_to_end(tmp_path):
    """Two runs averaged into one checkpoint; the threshold chosen on validation is the one the
    checkpoint stores and every reader applies, and it keeps validation precision at 1."""
    base, data = separable_setup(tmp_path)
    out = finetune_spam(SpamConfig(base=str(base), data=data, out=tmp_path / "spam", epochs=2, lr=1e-3,
                                   trainable_blocks=1, average_seeds=2, device="cpu"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["seed"] for m in metrics["average_seeds"]] == [123, 124]
    assert set(metrics["variants"]) == {"seed 123", "seed 124", "mean probability of 2 seeds", "weight average of 2 seeds"}
    threshold = metrics["threshold"]
    assert threshold["rule"].startswith("highest validation recall")
    assert metrics["val"]["precision"] == 1.0
    # The saved model is the weight average: its reports are that variant's at the chosen threshold.
    averaged = metrics["variants"]["weight average of 2 seeds"]["validation threshold"]
    assert averaged["test"]["confusion_matrix"] == metrics["test"]["confusion_matrix"]
    ckpt = load_checkpoint(out)
    assert ckpt.metadata["threshold"] == pytest.approx(threshold["probability"])
    assert evaluate_spam(out, data, device="cpu")["threshold"] == pytest.approx(threshold["probability"])


def test_average_states_is_the_mean_and_configs_are_checked():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    assert average_states([a, b])["w"].tolist() == [2.0, 4.0]
    for bad, message in ((dict(average_seeds=0), "--average-seeds must be >= 1"),
                         (dict(threshold="median"), "--threshold must be one of argmax, validation"),
                         (dict(min_precision=1.5), r"--min-precision must be in \(0, 1\]")):
        with pytest.raises(ValueError, match=message):
            SpamConfig(**bad)


def test_bad_inputs_are_clear_errors(tmp_path, tiny_base):
    with pytest.raises(BaseModelError, match="no checkpoint directory there"):
        finetune_spam(SpamConfig(base=str(tmp_path / "nope"), data=write_spam(tmp_path / "sms"), out=tmp_path / "o"))
    with pytest.raises(BaseModelError, match="neither a checkpoint directory nor a known model"):
        finetune_spam(SpamConfig(base="no-such-model", data=write_spam(tmp_path / "sms"), out=tmp_path / "o"))
    bad = tmp_path / "bad"
    bad.write_text("ham\tfine\nthis line has no label\n")
    with pytest.raises(SpamDataError, match="bad, line 2"):
        finetune_spam(SpamConfig(base=str(tiny_base), data=bad, out=tmp_path / "o"))
    with pytest.raises(SpamDataError, match="leave the val split empty"):
        finetune_spam(SpamConfig(base=str(tiny_base), data=write_spam(tmp_path / "few", 3, 3), out=tmp_path / "o"))
    with pytest.raises(ValueError, match="--warmup-steps 10000 must be in"):
        finetune_spam(SpamConfig(base=str(tiny_base), data=write_spam(tmp_path / "sms"), out=tmp_path / "o",
                                 schedule="cosine", warmup_steps=10_000))
    assert not (tmp_path / "o").exists()
