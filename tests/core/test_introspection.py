import math

import pytest
import torch

from core.classifier import SequenceClassifier
from core.model.config import ModelConfig
from core.generation.generate import GenerationConfig, generate
from core.introspection import (
    attention_maps, embedding_vectors, last_token_attention, next_token, occlusion, pca_2d, token_probabilities, word_index,
)
from core.model import GPTModel
from core.generation.sampling import SamplingConfig
from keyword_classifier import keyword_classifier


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel(ModelConfig(family="llama", vocab_size=64, context_length=32, emb_dim=32, n_layers=2, n_heads=4,
                                n_kv_heads=2, hidden_dim=48)).eval()


def test_attention_rows_are_distributions(model):
    maps = attention_maps(model, [1, 2, 3, 4, 5])
    assert len(maps) == 2 and maps[0].shape == (4, 5, 5)
    for m in maps:
        assert torch.allclose(m.sum(-1), torch.ones(4, 5), atol=1e-5)


def test_next_token_top_choice_is_the_greedy_token(model):
    prompt = [3, 9, 27]
    result = next_token(model, prompt, SamplingConfig(), k=64)
    greedy = generate(model, [prompt], GenerationConfig(max_new_tokens=1))[0][0]
    assert result.choices[0].token_id == greedy == result.greedy_id
    assert math.isclose(sum(c.probability for c in result.choices), 1.0, abs_tol=1e-5)
    assert 0 < result.entropy <= math.log(64) + 1e-6


def test_top_k_and_temperature_shape_the_distribution(model):
    result = next_token(model, [3, 9, 27], SamplingConfig(temperature=0.7, top_k=5), k=10)
    assert sum(c.probability > 0 for c in result.choices) == 5
    assert math.isclose(sum(c.probability for c in result.choices), 1.0, abs_tol=1e-5)


def test_token_probabilities_match_step_by_step(model):
    prompt, completion = [1, 2, 3], [7, 8, 9]
    probs = token_probabilities(model, prompt, completion)
    for i, token in enumerate(completion):
        step = next_token(model, prompt + completion[:i], SamplingConfig(), k=64)
        expected = next(c.probability for c in step.choices if c.token_id == token)
        assert math.isclose(probs[i], expected, rel_tol=1e-4)


def test_pca_recovers_known_directions():
    # Points spread far along x, a little along y, not at all along z.
    pts = torch.tensor([[-10.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, -2.0, 0.0]])
    coords, ratios = pca_2d(pts)
    assert torch.allclose(coords[:, 0].abs(), torch.tensor([10.0, 10.0, 0.0, 0.0]), atol=1e-4)
    assert torch.allclose(coords[:, 1].abs(), torch.tensor([0.0, 0.0, 2.0, 2.0]), atol=1e-4)
    assert ratios[0] > 0.9 and math.isclose(float(ratios.sum()), 1.0, abs_tol=1e-5)


def test_embedding_vectors_average_tokens(model):
    vecs = embedding_vectors(model, [[1], [2, 3]])
    assert torch.allclose(vecs[1], model.tok_emb.weight[2:4].mean(0))


def test_last_token_attention_sums_to_one():
    torch.manual_seed(0)
    clf = SequenceClassifier(GPTModel(ModelConfig(vocab_size=64, context_length=16, emb_dim=16, n_layers=2, n_heads=2)), 2)
    attention = last_token_attention(clf.eval(), [5, 6, 7, 8])
    assert math.isclose(sum(attention), 1.0, abs_tol=1e-5)


def test_word_index_starts_a_word_at_whitespace():
    pieces = [b"W", b"IN", b"NER", b"!!", b" Call", b" ", b"0", b"9", b" to", b"\n", b"claim"]
    assert word_index(pieces) == [0, 0, 0, 0, 1, 2, 2, 2, 3, 4, 4]
    assert word_index([]) == []


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_occlusion_is_the_log_odds_without_each_group(family):
    """Each push is exactly the change a forward pass sees when the group's tokens are deleted."""
    torch.manual_seed(0)
    extra = dict(n_kv_heads=1, hidden_dim=48) if family == "llama" else {}
    clf = SequenceClassifier(GPTModel(ModelConfig(family=family, vocab_size=64, context_length=16, emb_dim=32,
                                                  n_layers=2, n_heads=4, **extra)), 2).eval()
    torch.nn.init.normal_(clf.head.weight, std=1.0)
    ids, groups = [5, 6, 7, 8, 9, 10], [0, 0, 1, 2, 2, 3]
    result = occlusion(clf, ids, groups, positive=1, negative=0, pad_id=0)

    def log_odds(x):
        with torch.inference_mode():
            logits = clf(torch.tensor([x]))[0]
        return float(logits[1] - logits[0])

    assert result.log_odds == pytest.approx(log_odds(ids), abs=1e-4)
    for k in range(4):
        without = [t for t, g in zip(ids, groups) if g != k]
        assert result.push[k] == pytest.approx(log_odds(ids) - log_odds(without), abs=1e-4)
    assert len({round(p, 3) for p in result.push}) > 1  # the groups do differ, so a mix-up would show
    # The other class's point of view flips every sign.
    flipped = occlusion(clf, ids, groups, positive=0, negative=1, pad_id=0)
    assert flipped.push == pytest.approx([-p for p in result.push], abs=1e-6)
    # A lone word's text, deleted, reads as one padding token (as classify reads an empty text).
    alone = occlusion(clf, [5, 6], [0, 0], positive=1, negative=0, pad_id=3)
    assert alone.push == pytest.approx([log_odds([5, 6]) - log_odds([3])], abs=1e-4)
    with pytest.raises(ValueError, match="6 tokens but 2 group numbers"):
        occlusion(clf, ids, [0, 1], positive=1, negative=0, pad_id=0)


def test_occlusion_points_spam_words_towards_spam():
    """On a classifier built so that only the spam words raise the spam log-odds, every spam word
    pushes towards spam (+) and every other word towards ham (-)."""
    spam_ids = {11, 12}
    clf = keyword_classifier(spam_ids, vocab_size=64, context_length=16)
    ids = [3, 11, 4, 12, 5]
    result = occlusion(clf, ids, list(range(len(ids))), positive=1, negative=0, pad_id=0)
    assert result.log_odds > 0  # two spam words in five: spam
    for token, push in zip(ids, result.push):
        assert (push > 0) == (token in spam_ids), (token, push)
    assert occlusion(clf, [3, 4, 5], [0, 1, 2], 1, 0, 0).log_odds < 0  # no spam word: ham
