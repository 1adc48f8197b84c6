"""The Lab's word/char/BPE comparison and its zero-shot against few-shot view, against the tiny real checkpoints."""

from __future__ import annotations

import pytest
from app_testing import running_client

from core.few_shot import SENTIMENT, SPAM, few_shot_prompt
from core.generation.chat_template import ALPACA
from core.tokenizer import CharTokenizer, WordTokenizer

LAB = "/api/v1/lab"
REFERENCE = "The cat sat on the mat. The dog sat on the rug. " * 4


# --- word / char / BPE --------------------------------------------------------------------------


def test_levels_count_each_tokenizer_on_the_same_text(client, gpt2_tok):
    text = "The cat sat on the sofa, purring."
    response = client.post(f"{LAB}/tokenizer-levels", json={"text": text, "reference": REFERENCE, "bpe_vocab_size": 270})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["characters"] == len(text) and body["words"] == 7
    levels = {level["key"]: level for level in body["levels"]}
    assert list(levels) == ["word", "char", "bpe", "gpt2"]
    word, char = WordTokenizer.train(REFERENCE), CharTokenizer.train(REFERENCE)
    assert [t["id"] for t in levels["word"]["tokens"]] == word.encode(text)
    assert levels["word"]["vocab_size"] == word.vocab_size and levels["word"]["unknown"] == 3  # sofa , purring
    assert [t["text"] for t in levels["word"]["tokens"]][5:7] == ["<|unk|>", "<|unk|>"]
    assert levels["word"]["tokens"][5]["special"]  # drawn as a special chip
    assert levels["char"]["count"] == len(text)
    assert levels["char"]["unknown"] == sum(ch not in REFERENCE for ch in text)
    assert levels["char"]["vocab_size"] == char.vocab_size
    assert levels["bpe"]["vocab_size"] == 270 and levels["bpe"]["unknown"] == 0
    assert levels["bpe"]["name"] == "BPE trained on the reference"
    assert b"".join(bytes.fromhex(t["bytes_hex"]) for t in levels["bpe"]["tokens"]) == text.encode()
    assert [t["id"] for t in levels["gpt2"]["tokens"]] == gpt2_tok.encode(text)
    assert levels["gpt2"]["vocab_size"] == 50257
    for level in levels.values():
        assert level["count"] == len(level["tokens"])
        assert level["tokens_per_word"] == pytest.approx(level["count"] / 7, abs=1e-3)


def test_levels_without_bpe_size_and_without_any_model(make_settings):
    with running_client(make_settings(chat_enabled=False, classifier_enabled=False)) as client:
        body = client.post(f"{LAB}/tokenizer-levels", json={"text": "a cat", "reference": REFERENCE}).json()
        assert [level["key"] for level in body["levels"]] == ["word", "char", "gpt2"]


def test_a_short_reference_gives_bpe_the_merges_it_has(client):
    """More merges asked than the reference has pairs for: the vocabulary stops where they run out."""
    body = client.post(f"{LAB}/tokenizer-levels", json={"text": "a cat", "reference": "a cat", "bpe_vocab_size": 1024})
    assert body.status_code == 200, body.text
    bpe = next(level for level in body.json()["levels"] if level["key"] == "bpe")
    assert bpe["vocab_size"] == 256 + 3 + 1  # three merges make " cat" one token; then <|endoftext|>
    assert bpe["count"] == 2  # "a", " cat": every piece one token


@pytest.mark.parametrize(("payload", "message"), [
    ({"text": "hi", "reference": "x" * 20_001}, "at most 20000"),
    ({"text": "hi", "reference": "  "}, "empty or only whitespace"),
    ({"text": "hi", "reference": REFERENCE, "bpe_vocab_size": 100}, "greater than or equal to 257"),
    ({"text": "", "reference": REFERENCE}, "at least 1"),
])
def test_levels_limits_are_422_with_a_message(client, payload, message):
    response = client.post(f"{LAB}/tokenizer-levels", json=payload)
    assert response.status_code == 422
    assert message in str(response.json()["detail"])


# --- zero-shot against few-shot --------------------------------------------------------------------


def test_few_shot_gives_each_k_its_prompt_answer_and_label_probabilities(client, gpt2_tok):
    text = "I loved every minute."
    response = client.post(f"{LAB}/few-shot", json={"task": "sentiment", "text": text})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny-chat" and body["labels"] == ["positive", "negative"]
    assert body["instruction"] == SENTIMENT.instruction
    assert [a["k"] for a in body["attempts"]] == [0, 1, 3]
    for attempt in body["attempts"]:
        assert attempt["prompt"] == few_shot_prompt(SENTIMENT, text, attempt["k"])
        assert attempt["prompt_tokens"] == len(gpt2_tok.encode(attempt["prompt"]))
        probabilities = {s["label"]: s["probability"] for s in attempt["labels"]}
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert attempt["predicted"] == max(probabilities, key=probabilities.get)
        assert 0 <= attempt["label_mass"] <= 1 and "\n" not in attempt["answer"]
    # More examples, longer prompt: each demonstration is in it.
    assert body["attempts"][0]["prompt_tokens"] < body["attempts"][1]["prompt_tokens"] < body["attempts"][2]["prompt_tokens"]


def test_few_shot_in_the_chat_template_keeps_typed_specials_as_text(client):
    text = "Win money now<|endoftext|>"
    body = client.post(f"{LAB}/few-shot", json={"task": "spam", "text": text, "shots": [2], "chat_template": True}).json()
    (attempt,) = body["attempts"]
    assert "### Instruction:" in attempt["prompt"] and SPAM.examples[1].text in attempt["prompt"]
    # The tiny model's tokenizer is GPT-2's: its end-of-text marker must not reach the model as one.
    assert "<|endoftext|>" not in attempt["prompt"] and "Win money now<\u200b|endoftext|>" in attempt["prompt"]
    assert attempt["prompt"] == few_shot_prompt(SPAM, "Win money now<\u200b|endoftext|>", 2, ALPACA)


@pytest.mark.parametrize(("payload", "message"), [
    ({"task": "weather", "text": "hi"}, "'sentiment' or 'spam'"),
    ({"text": "hi", "shots": [7]}, "less than or equal to 6"),
    ({"text": "hi", "shots": []}, "at least 1"),
    ({"text": "hi", "shots": [0, 1, 2, 3, 4]}, "at most 4"),
    ({"text": "x" * 501}, "at most 500"),
    ({"text": " "}, "empty or only whitespace"),
])
def test_few_shot_limits_are_422_with_a_message(client, payload, message):
    response = client.post(f"{LAB}/few-shot", json=payload)
    assert response.status_code == 422
    assert message in str(response.json()["detail"])


def test_few_shot_without_chat_model_says_why(make_settings):
    with running_client(make_settings(chat_enabled=False, classifier_enabled=False)) as client:
        response = client.post(f"{LAB}/few-shot", json={"text": "hi"})
        assert response.status_code == 503 and "SCRATCHGPT_CHAT_ENABLED" in response.json()["detail"]


@pytest.mark.parametrize("name", ["levels", "few-shot"])
def test_pages_load_their_script(client, name):
    page = client.get(f"/lab/{name}")
    assert page.status_code == 200
    assert f'/static/js/lab/{name.replace("-", "_")}.js' in page.text and 'aria-current="page"' in page.text
