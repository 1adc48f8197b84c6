"""Packed classification (core/classifier.py): texts sharing a row classify exactly as they do alone."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from core.classifier import (
    PackedBatch, SequenceClassifier, ThresholdError, classify, decide, decision_threshold, encode_texts, pack_texts,
)
from core.model.config import ModelConfig
from core.model import GPTModel
from core.tokenizer.gpt2 import gpt2_tokenizer

TEXTS = [
    "Ok lar... Joking wif u oni...",
    "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward!",
    "",  # an empty text classifies as a lone padding token
    "k",
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121 to receive entry "
    "question(std txt rate)T&C's apply 08452810075over18's",  # longer than max_length below: cut
    "hello <|endoftext|> world",
    "Nah I don't think he goes to usf, he lives around here though",
    "Even my brother is not like to speak with me.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def tiny(family: str) -> ModelConfig:
    extra = dict(n_kv_heads=1, hidden_dim=48) if family == "llama" else {}
    return ModelConfig(family=family, vocab_size=50257, context_length=64, emb_dim=32, n_layers=2, n_heads=4, **extra)


def checkpoint(family: str, tokenizer, max_length: int = 24):
    torch.manual_seed(0)
    model = SequenceClassifier(GPTModel(tiny(family)), num_classes=2).eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)  # probabilities far from 0.5, so differences show
    return SimpleNamespace(model=model, tokenizer=tokenizer, labels=["ham", "spam"], metadata={"max_length": max_length})


def test_pack_texts_lays_every_text_once_within_capacity():
    rng = random.Random(0)
    encoded = [[rng.randrange(1, 100) for _ in range(rng.randint(1, 30))] for _ in range(40)] + [[7] * 50]
    batch = pack_texts(encoded, capacity=40, pad_id=0)
    real = batch.segments >= 0
    assert batch.real_tokens == sum(map(len, encoded))
    for row in range(batch.ids.shape[0]):
        used = int(real[row].sum())
        assert used <= 40 or batch.segments[row].max() == 0  # only a lone text may pass the capacity
    for i, ids in enumerate(encoded):
        r, end = int(batch.last_row[i]), int(batch.last_col[i])
        start = end - len(ids) + 1
        assert batch.ids[r, start : end + 1].tolist() == ids
        assert batch.positions[r, start : end + 1].tolist() == list(range(len(ids)))
        assert len(set(batch.segments[r, start : end + 1].tolist())) == 1
    # First-fit decreasing fills the rows: hardly more of them than the tokens need.
    assert batch.ids.shape[0] <= math.ceil(batch.real_tokens / 40) + 1


def test_packed_mask_is_block_diagonal_and_causal():
    batch = pack_texts([[1, 2, 3], [4, 5]], capacity=8, pad_id=0)
    mask = batch.mask()[0, 0].int().tolist()
    # Row: the 3-token text, then the 2-token text.
    assert mask == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    padded = pack_texts([[1] * 6, [2, 3]], capacity=6, pad_id=0)
    assert padded.mask()[:, 0].diagonal(dim1=-2, dim2=-1).all()  # every query, padding included, sees itself


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("capacity", [16, 512])
def test_packed_classification_equals_one_text_at_a_time(tokenizer, family, capacity):
    ckpt = checkpoint(family, tokenizer)
    alone = [classify(ckpt, [t], batch_size=1, pack_tokens=None)[0] for t in TEXTS]
    packed = classify(ckpt, TEXTS, batch_size=32, pack_tokens=capacity)
    padded = classify(ckpt, TEXTS, batch_size=32, pack_tokens=None)
    spread = max(p.probabilities["spam"] for p in alone) - min(p.probabilities["spam"] for p in alone)
    assert spread > 0.1  # the texts do get different answers, so a mix-up would show
    for a, p, q in zip(alone, packed, padded):
        assert p.label == a.label == q.label
        for label in ("ham", "spam"):
            assert p.probabilities[label] == pytest.approx(a.probabilities[label], abs=1e-5)
            assert q.probabilities[label] == pytest.approx(a.probabilities[label], abs=1e-5)


def test_packed_logits_match_and_neighbours_do_not_leak(tokenizer):
    ckpt = checkpoint("llama", tokenizer)
    model = ckpt.model
    encoded = encode_texts(tokenizer, TEXTS, 24, tokenizer.eos_id)
    with torch.inference_mode():
        alone = torch.cat([model(torch.tensor([e])) for e in encoded])
        packed = model.forward_packed(pack_texts(encoded, 64, tokenizer.eos_id))
        # The same texts with the first one changed: no other text's logits may move.
        changed = model.forward_packed(pack_texts([[11, 12, 13, 14]] + encoded[1:], 64, tokenizer.eos_id))
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed[0], packed[0])
    torch.testing.assert_close(changed[1:], packed[1:], atol=1e-5, rtol=1e-5)


def test_pack_texts_refuses_nothing_to_pack():
    with pytest.raises(ValueError, match="no texts"):
        pack_texts([], 16, 0)
    with pytest.raises(ValueError, match="capacity"):
        pack_texts([[1]], 0, 0)


def test_packed_batch_is_a_plain_record():
    batch = pack_texts([[5, 6]], capacity=4, pad_id=0)
    assert isinstance(batch, PackedBatch)
    assert batch.ids.tolist() == [[5, 6]] and batch.last_col.tolist() == [1]


# -- the stored decision threshold -------------------------------------------------------


def test_stored_threshold_decides_the_label(tokenizer):
    ckpt = checkpoint("llama", tokenizer)
    plain = classify(ckpt, TEXTS)
    spam = sorted(p.probabilities["spam"] for p in plain)
    # A cut between the two middle texts' spam probabilities: everything at or above it is spam.
    cut = (spam[3] + spam[4]) / 2
    ckpt.metadata["threshold"] = cut
    cut_labels = [p.label for p in classify(ckpt, TEXTS)]
    assert cut_labels == ["spam" if p.probabilities["spam"] >= cut else "ham" for p in plain]
    assert cut_labels.count("spam") == 4
    # Probabilities are the model's, whatever the cut.
    assert [p.probabilities for p in classify(ckpt, TEXTS)] == [p.probabilities for p in plain]


def test_decide_and_bad_thresholds(tokenizer):
    assert decide([0.7, 0.3], None) == 0 and decide([0.7, 0.3], 0.25) == 1 and decide([0.2, 0.8], 0.9) == 0
    ckpt = checkpoint("gpt2", tokenizer)
    ckpt.name = "tiny"
    for bad in (0.0, 1.0, 1.5, "0.3", True):
        ckpt.metadata["threshold"] = bad
        with pytest.raises(ThresholdError, match="not a probability in"):
            decision_threshold(ckpt)
