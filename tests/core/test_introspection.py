import math

import pytest
import torch

from core.classifier import SequenceClassifier
from core.model.config import ModelConfig
from core.generation.generate import GenerationConfig, generate
from core.introspection import (
    attention_maps, embedding_vectors, input_x_gradient, last_token_attention, next_token, pca_2d, token_probabilities,
)
from core.model import GPTModel
from core.generation.sampling import SamplingConfig


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


def test_classifier_attributions():
    torch.manual_seed(0)
    clf = SequenceClassifier(GPTModel(ModelConfig(vocab_size=64, context_length=16, emb_dim=16, n_layers=2, n_heads=2)), 2)
    clf.eval()
    scores = input_x_gradient(clf, [5, 6, 7, 8], target=1)
    assert len(scores) == 4 and any(abs(s) > 0 for s in scores)
    attention = last_token_attention(clf, [5, 6, 7, 8])
    assert math.isclose(sum(attention), 1.0, abs_tol=1e-5)
