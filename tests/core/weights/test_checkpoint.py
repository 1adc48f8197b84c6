import json

import pytest
import torch

from core.generation.chat_template import ALPACA
from core.weights.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from core.classifier import SequenceClassifier, classify
from core.model.config import ModelConfig
from core.model import GPTModel
from core.tokenizer.gpt2 import gpt2_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def tiny(family="gpt2"):
    extra = dict(n_kv_heads=1, hidden_dim=40) if family == "llama" else {}
    return ModelConfig(family=family, vocab_size=50257, context_length=32, emb_dim=16, n_layers=2, n_heads=2, **extra)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_round_trip_keeps_weights_template_and_tokenizer(tmp_path, tokenizer, family):
    torch.manual_seed(0)
    model = GPTModel(tiny(family)).eval()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, chat_template=ALPACA, metadata={"name": "tiny"})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_checkpoint(tmp_path / "ckpt")
    ids = torch.randint(0, 50257, (1, 12))
    assert torch.equal(loaded.model(ids), model(ids))
    assert loaded.chat_template.render([{"role": "user", "content": "Hi"}]) == ALPACA.render([{"role": "user", "content": "Hi"}])
    assert loaded.tokenizer.encode("Hello world") == tokenizer.encode("Hello world")
    assert loaded.name == "tiny" and loaded.config == model.cfg
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directories left


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_classifier_round_trip_gives_equal_probabilities(tmp_path, tokenizer, family):
    """The reloaded classifier computes exactly the saved one's logits, and classify() turns them
    into the same labels and probabilities."""
    torch.manual_seed(0)
    clf = SequenceClassifier(GPTModel(tiny(family)), num_classes=2).eval()
    with torch.no_grad():
        clf.head.weight.mul_(30.0)  # probabilities well away from 0.5, and from each other
    save_checkpoint(tmp_path / "clf", clf, tokenizer, task="classification", labels=["ham", "spam"])
    loaded = load_checkpoint(tmp_path / "clf")
    texts = ["win a prize now", "see you at lunch", "URGENT! call 0906 to claim your cash", "ok"]
    preds = classify(loaded, texts)
    with torch.no_grad():
        for text, pred in zip(texts, preds):
            ids = torch.tensor([tokenizer.encode(text)])
            logits = clf(ids)[0]
            assert torch.equal(loaded.model(ids)[0], logits)
            probabilities = logits.softmax(-1).tolist()
            assert [pred.probabilities["ham"], pred.probabilities["spam"]] == pytest.approx(probabilities, abs=1e-6)
            assert pred.label == ["ham", "spam"][int(logits.argmax())]
    spam = [p.probabilities["spam"] for p in preds]
    assert max(spam) - min(spam) > 0.1  # different texts, different answers: a mix-up would show


def test_padding_does_not_move_the_classification(tokenizer):
    torch.manual_seed(0)
    clf = SequenceClassifier(GPTModel(tiny()), num_classes=2).eval()
    ids = torch.tensor([tokenizer.encode("free entry in a weekly competition")])
    padded = torch.cat([ids, torch.full((1, 7), tokenizer.eos_id)], dim=1)
    alone = clf(ids)
    assert torch.allclose(clf(padded, torch.tensor([ids.shape[1]])), alone, atol=1e-6)
    assert not torch.allclose(clf(padded), alone, atol=1e-3)  # reading the last pad would differ


def test_frozen_prefix_path_equals_full_forward(tokenizer):
    torch.manual_seed(0)
    clf = SequenceClassifier(GPTModel(tiny()), num_classes=2).eval()
    ids = torch.randint(0, 50257, (3, 10))
    lengths = torch.tensor([10, 6, 3])
    backbone = clf.backbone
    ctx = backbone.context(ids)
    prefix = backbone.embed(ids, ctx)
    prefix = backbone.blocks[0](prefix, ctx)[0]
    assert torch.allclose(clf.forward_from(prefix, 1, lengths), clf(ids, lengths), atol=1e-6)


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path, tokenizer):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "empty")
    save_checkpoint(tmp_path / "c", GPTModel(tiny()), tokenizer)
    weights = tmp_path / "c" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "c")


def test_config_that_does_not_match_the_weights_is_refused(tmp_path, tokenizer):
    save_checkpoint(tmp_path / "c", GPTModel(tiny()), tokenizer)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["model"]["emb_dim"] = 32
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path / "c")


def test_saving_over_a_checkpoint_replaces_it_whole(tmp_path, tokenizer):
    first, second = GPTModel(tiny()), GPTModel(tiny())
    save_checkpoint(tmp_path / "c", first, tokenizer)
    save_checkpoint(tmp_path / "c", second, tokenizer)
    loaded = load_checkpoint(tmp_path / "c")
    assert torch.equal(loaded.model.tok_emb.weight, second.tok_emb.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_bfloat16_load(tmp_path, tokenizer):
    save_checkpoint(tmp_path / "c", GPTModel(tiny("llama")), tokenizer)
    loaded = load_checkpoint(tmp_path / "c", dtype=torch.bfloat16)
    assert loaded.model.tok_emb.weight.dtype == torch.bfloat16
    assert loaded.model(torch.tensor([[1, 2, 3]])).isfinite().all()


def test_classifying_text_with_special_token_strings(tmp_path, tokenizer):
    clf = SequenceClassifier(GPTModel(tiny()), num_classes=2).eval()
    save_checkpoint(tmp_path / "clf", clf, tokenizer, task="classification", labels=["ham", "spam"])
    [prediction] = classify(load_checkpoint(tmp_path / "clf"), ["hello <|endoftext|> world"])
    assert prediction.label in ("ham", "spam")
