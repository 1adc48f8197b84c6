"""Zero- and few-shot prompting: the prompt as built, label probabilities against a direct computation, errors."""

from __future__ import annotations

import math

import pytest
import torch

from core.few_shot import SENTIMENT, SPAM, TASKS, FewShotError, classify_few_shot, few_shot_prompt, get_task, score_labels
from core.generation.chat_template import ALPACA, CHATML
from core.model import GPTModel
from core.model.config import ModelConfig
from core.paths import models_dir
from core.tokenizer.gpt2 import gpt2_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel(ModelConfig(vocab_size=50257, context_length=256, emb_dim=32, n_layers=2, n_heads=2)).eval()


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def test_plain_prompt_is_instruction_examples_then_the_question():
    prompt = few_shot_prompt(SENTIMENT, "Loved it.", 2)
    first, second = SENTIMENT.examples[:2]
    assert prompt == (
        f"{SENTIMENT.instruction}\n\n"
        f"Review: {first.text}\nSentiment: {first.label}\n\n"
        f"Review: {second.text}\nSentiment: {second.label}\n\n"
        "Review: Loved it.\nSentiment:"
    )
    assert few_shot_prompt(SENTIMENT, "Loved\n it.", 0) == f"{SENTIMENT.instruction}\n\nReview: Loved it.\nSentiment:"


def test_chat_prompt_shows_each_example_as_a_turn():
    prompt = few_shot_prompt(SPAM, "Call me back", 1, CHATML)
    shot = SPAM.examples[0]
    assert prompt == (
        f"<|im_start|>system\n{SPAM.instruction} Answer with one word: spam or ham.<|im_end|>\n"
        f"<|im_start|>user\nMessage: {shot.text}<|im_end|>\n"
        f"<|im_start|>assistant\n{shot.label}<|im_end|>\n"
        "<|im_start|>user\nMessage: Call me back<|im_end|>\n<|im_start|>assistant\n"
    )


def test_small_k_sees_both_labels_in_turn():
    for task in TASKS.values():
        assert {e.label for e in task.demonstrations(2)} == set(task.labels)


# One token per label, and labels of one to three tokens (the cached path for the later ones).
@pytest.mark.parametrize("labels", [SENTIMENT.labels, ("definitely not spam", "spam", "ham sandwich")])
def test_label_scores_are_the_models_own_probabilities(model, tok, labels):
    """Against one full forward pass per label (the scores come from a cache rewound between labels)."""
    prompt = tok.encode(few_shot_prompt(SENTIMENT, "Great fun.", 1))
    scores = score_labels(model, tok, prompt, labels, " ")
    assert [s.label for s in scores] == list(labels)
    with torch.no_grad():
        for score in scores:
            label_ids = tok.encode(" " + score.label)
            logprobs = model(torch.tensor([prompt + label_ids])).log_softmax(-1)[0]
            expected = sum(logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(label_ids))
            assert score.logprob == pytest.approx(expected, abs=1e-4)
    assert sum(s.probability for s in scores) == pytest.approx(1.0)
    odds = math.exp(scores[0].logprob - scores[1].logprob)
    assert scores[0].probability / scores[1].probability == pytest.approx(odds, rel=1e-6)


@pytest.mark.parametrize("template", [None, ALPACA])
def test_classify_gives_the_answer_and_the_most_likely_label(model, tok, template):
    result = classify_few_shot(model, tok, SPAM, "You won a prize", 3, template, max_answer_tokens=4)
    assert result.k == 3 and result.prompt == few_shot_prompt(SPAM, "You won a prize", 3, template)
    assert result.prompt_ids == tok.encode(result.prompt, allowed_special="all")
    assert [s.label for s in result.scores] == ["spam", "ham"]
    assert result.predicted == max(result.scores, key=lambda s: s.probability).label
    assert 0 < result.label_mass <= 1
    assert len(tok.encode(result.answer)) <= 4 + 1  # four tokens at most; re-encoding the text may split one more
    assert "\n" not in result.answer


def test_bad_requests_say_what_to_change(model, tok):
    with pytest.raises(FewShotError, match="unknown task 'weather'; choose one of sentiment, spam"):
        get_task("weather")
    with pytest.raises(FewShotError, match="k=7: task 'spam' has 6 examples"):
        few_shot_prompt(SPAM, "hi", 7)
    with pytest.raises(FewShotError, match="empty"):
        few_shot_prompt(SPAM, " \n ", 0)
    small = GPTModel(ModelConfig(vocab_size=50257, context_length=64, emb_dim=16, n_layers=1, n_heads=2)).eval()
    with pytest.raises(FewShotError, match="does not fit the model's context of 64"):
        classify_few_shot(small, tok, SPAM, "hi", 3)


@pytest.mark.slow
def test_examples_teach_smollm2_to_answer_with_the_labels():
    """The GPT-3 paper's point on a 135M chat model: with no example its probability is elsewhere
    (it writes "Positive", or a sentence); after three examples most of it is on the label words."""
    from core.weights.checkpoint import load_checkpoint

    path = models_dir() / "smollm2-135m-instruct"
    if not (path / "config.json").is_file():
        pytest.skip("SmolLM2 checkpoint not found: run `scratchgpt download smollm2-135m-instruct`")
    ckpt = load_checkpoint(path)
    text = "The worst film I have seen this year."
    zero = classify_few_shot(ckpt.model, ckpt.tokenizer, SENTIMENT, text, 0)
    three = classify_few_shot(ckpt.model, ckpt.tokenizer, SENTIMENT, text, 3)
    assert zero.label_mass < 0.2 < 0.6 < three.label_mass
    assert three.predicted == "negative" and three.answer == "negative"
