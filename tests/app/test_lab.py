"""The Lab's JSON endpoints against the tiny real checkpoints: shapes, values and limits."""

from __future__ import annotations

import math
import threading

import anyio
import pytest
import torch

from app_testing import browser_session, parse_sse, running_client

LAB = "/api/v1/lab"


def served(client, role: str = "chat"):
    """The checkpoint the app serves (the Lab must measure this very object)."""
    return client.app.state.models.slots[role].checkpoint


# --- tokenizer ------------------------------------------------------------------------------


def test_tokenize_gives_both_tokenizers_with_ids_and_bytes(client, gpt2_tok):
    text = "Hello wörld 東京<|endoftext|>"
    response = client.post(f"{LAB}/tokenize", json={"text": text})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [t["key"] for t in body["tokenizers"]] == ["gpt2", "chat"]
    assert body["characters"] == len(text) and body["bytes"] == len(text.encode())
    expected = gpt2_tok.encode(text, allowed_special="all")
    for tokenization in body["tokenizers"]:
        ids = [t["id"] for t in tokenization["tokens"]]
        assert ids == expected and tokenization["count"] == len(expected)
        assert b"".join(bytes.fromhex(t["bytes_hex"]) for t in tokenization["tokens"]) == text.encode()
        assert [t["special"] for t in tokenization["tokens"]] == [i == 50256 for i in ids]
    # 東 and 京 are three bytes each, split over tokens that are not whole characters on their own.
    assert any("\ufffd" in t["text"] for t in body["tokenizers"][0]["tokens"])
    assert body["notes"] == []


def test_tokenize_without_chat_model_shows_gpt2_and_says_why(make_settings):
    with running_client(make_settings(chat_enabled=False, classifier_enabled=False)) as client:
        body = client.post(f"{LAB}/tokenize", json={"text": "hi there"}).json()
        assert [t["key"] for t in body["tokenizers"]] == ["gpt2"]
        assert "SCRATCHGPT_CHAT_ENABLED" in body["notes"][0]
        # Endpoints that need the model answer 503 with the reason.
        assert client.post(f"{LAB}/attention", json={"text": "hi"}).status_code == 503


def test_bpe_merges_step_by_step_end_in_the_encoding(client, gpt2_tok):
    word = " tokenization"
    body = client.post(f"{LAB}/merges", json={"word": word}).json()
    assert body["tokenizer"] == "GPT-2" and [p["text"] for p in body["pieces"]] == [word]
    steps = body["pieces"][0]["steps"]
    assert [bytes.fromhex(p["bytes_hex"]) for p in steps[0]] == [bytes([b]) for b in word.encode()]
    for before, after in zip(steps, steps[1:]):
        assert len(after) == len(before) - 1  # one merge per step
        assert b"".join(bytes.fromhex(p["bytes_hex"]) for p in after) == word.encode()
    assert [p["token"]["id"] for p in steps[-1]] == gpt2_tok.encode(word)
    chat = client.post(f"{LAB}/merges", json={"word": word, "tokenizer": "chat"}).json()
    assert [p["token"]["id"] for p in chat["pieces"][0]["steps"][-1]] == gpt2_tok.encode(word)


def test_bpe_merges_never_cross_pre_tokens(client, gpt2_tok):
    body = client.post(f"{LAB}/merges", json={"word": "Hello, world!"}).json()
    assert [p["text"] for p in body["pieces"]] == ["Hello", ",", " world", "!"]
    final = [part["token"]["id"] for piece in body["pieces"] for part in piece["steps"][-1]]
    assert final == gpt2_tok.encode("Hello, world!")


@pytest.mark.parametrize(("word", "message"), [("x" * 65, "at most 64"), ("", "at least 1"), (7, "JSON string")])
def test_bpe_merges_limits(client, word, message):
    response = client.post(f"{LAB}/merges", json={"word": word})
    assert response.status_code == 422
    assert message in str(response.json()["detail"])


# --- attention --------------------------------------------------------------------------------


def test_attention_rows_are_distributions_and_match_the_model(client):
    from core.introspection import attention_maps

    text = "The cat sat on the mat because it was tired."
    response = client.post(f"{LAB}/attention", json={"text": text, "layer": 1})
    assert response.status_code == 200, response.text
    body = response.json()
    n = len(body["tokens"])
    assert (body["n_layers"], body["n_heads"], body["layer"], body["heads"]) == (2, 2, 1, [0, 1])
    weights = torch.tensor(body["weights"])
    assert weights.shape == (2, n, n)
    assert torch.allclose(weights.sum(-1), torch.ones(2, n), atol=1e-3)
    assert torch.all(weights.triu(1) == 0)  # causal: nothing from the future
    assert torch.allclose(torch.tensor(body["average"]), weights.mean(0), atol=1e-4)
    ckpt = served(client)
    expected = attention_maps(ckpt.model, [t["id"] for t in body["tokens"]])[1]
    assert torch.allclose(weights, expected, atol=1e-4)

    one = client.post(f"{LAB}/attention", json={"text": text, "layer": 0, "head": 1}).json()
    assert one["heads"] == [1] and len(one["weights"]) == 1


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"layer": 2}, "layer 2 does not exist: the model has 2 layers"),
        ({"head": 2}, "head 2 does not exist: each layer has 2 heads"),
        ({"text": "word " * 70}, "the limit here is 64 tokens"),
        ({"text": "   "}, "only whitespace"),
        ({"layer": -1}, "greater than or equal to 0"),
        ({"layer": "1"}, "JSON integer"),
        ({"layer": True}, "JSON integer"),
        ({"extra": 1}, "Extra inputs"),
    ],
)
def test_attention_limits_are_422_with_a_message(client, payload, message):
    response = client.post(f"{LAB}/attention", json={"text": "Hello there", **payload})
    assert response.status_code == 422
    assert message in str(response.json()["detail"])


# --- next token --------------------------------------------------------------------------------


def test_next_token_top_choice_is_the_greedy_next_token(client):
    from core.generation.generate import GenerationConfig, generate

    body = client.post(f"{LAB}/next-token", json={"text": "The capital of France is", "temperature": 0, "k": 5}).json()
    ids = [t["id"] for t in body["prompt"]]
    greedy = generate(served(client).model, [ids], GenerationConfig(max_new_tokens=1))[0][0]
    assert body["choices"][0]["token"]["id"] == body["greedy"]["id"] == greedy
    probs = [c["probability"] for c in body["choices"]]
    assert probs == sorted(probs, reverse=True)
    assert body["text"] == "The capital of France is"


def test_next_token_probabilities_sum_to_one_and_entropy_matches(client):
    body = client.post(
        f"{LAB}/next-token", json={"text": "Once upon a time", "temperature": 0.8, "top_k": 5, "k": 10}
    ).json()
    probs = [c["probability"] for c in body["choices"]]
    assert len(probs) == 10 and sum(p > 0 for p in probs) == 5  # top-k cut the rest
    assert math.isclose(sum(probs), 1.0, abs_tol=1e-4)
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    assert math.isclose(body["entropy"], entropy, abs_tol=1e-3)

    # Lower temperature sharpens the distribution: lower entropy.
    cold = client.post(f"{LAB}/next-token", json={"text": "Once upon a time", "temperature": 0.3, "top_k": 5}).json()
    assert cold["entropy"] < body["entropy"]
    nucleus = client.post(f"{LAB}/next-token", json={"text": "Once upon a time", "top_p": 1e-6, "k": 3}).json()
    # A nucleus smaller than the most likely token holds only that token.
    assert [c["probability"] for c in nucleus["choices"]] == [1.0, 0.0, 0.0]


def test_step_appends_a_chosen_token(client):
    first = client.post(f"{LAB}/next-token", json={"text": "Hello", "temperature": 0.7, "k": 3}).json()
    ids = [t["id"] for t in first["prompt"]] + [first["choices"][2]["token"]["id"]]
    second = client.post(f"{LAB}/next-token", json={"token_ids": ids, "temperature": 0.7}).json()
    assert [t["id"] for t in second["prompt"]] == ids
    assert second["text"] == "Hello" + first["choices"][2]["token"]["text"]


def test_next_token_in_the_chat_template(client):
    body = client.post(f"{LAB}/next-token", json={"text": "Say hi", "chat_template": True}).json()
    assert "### Instruction" in body["text"] and "Say hi" in body["text"]  # the tiny chat model uses Alpaca
    # The prompt a new chat's first message gets: under the same system prompt as the chat's.
    system = client.get("/api/v1/settings").json()["defaults"]["system_prompt"]
    assert system and system in body["text"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"text": "hi", "token_ids": [1]}, "exactly one of text and token_ids"),
        ({"text": None, "token_ids": [1]}, "string"),
        ({}, "exactly one of text and token_ids"),
        ({"token_ids": []}, "at least 1 item"),
        ({"token_ids": [50257]}, "outside the model's vocabulary"),
        ({"token_ids": [-1]}, "greater than or equal to 0"),
        ({"token_ids": [1] * 513}, "at most 512"),
        ({"text": "hi " * 600}, "the limit here is 512 tokens"),
        ({"text": "hi", "k": 51}, "less than or equal to 50"),
        ({"text": "hi", "temperature": 2.5}, "less than or equal to 2"),
        ({"text": "hi", "top_p": 0}, "greater than or equal to 0.000001"),
    ],
)
def test_next_token_limits_are_422(client, payload, message):
    response = client.post(f"{LAB}/next-token", json=payload)
    assert response.status_code == 422
    assert message in str(response.json()["detail"])


# --- a stored answer --------------------------------------------------------------------------


def _conversation_with_answer(client, headers=None) -> tuple[str, list[dict]]:
    cid = client.post(
        "/api/v1/conversations", json={"temperature": 0.0, "max_new_tokens": 12}, headers=headers
    ).json()["id"]
    with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "Name a colour."},
                       headers=headers) as response:
        assert response.status_code == 200
        events = list(parse_sse(response.iter_lines()))
    assert events[-1][0] == "done"
    return cid, client.get(f"/api/v1/conversations/{cid}", headers=headers).json()["messages"]


def test_answer_token_probabilities(client):
    from app.services.prompts import encode_prompt
    from core.introspection import token_probabilities

    cid, messages = _conversation_with_answer(client)
    user, answer = messages
    response = client.get(f"{LAB}/conversations/{cid}/messages/{answer['id']}/tokens")
    assert response.status_code == 200, response.text
    body = response.json()
    # The prompt is rebuilt exactly as it was when the answer was generated.
    assert body["prompt_tokens"] == answer["prompt_tokens"]
    ckpt = served(client)
    ids = [t["token"]["id"] for t in body["tokens"]]
    assert ckpt.tokenizer.decode(ids) == answer["content"]
    system = client.app.state.settings.default_system_prompt
    prompt = encode_prompt(ckpt, [{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}])
    expected = token_probabilities(ckpt.model, prompt, ids)
    got = [t["probability"] for t in body["tokens"]]
    assert all(0 < p <= 1 for p in got)
    assert got == pytest.approx(expected, abs=1e-5)
    assert body["perplexity"] == pytest.approx(math.exp(-sum(map(math.log, expected)) / len(expected)), rel=1e-3)

    assert client.get(f"{LAB}/conversations/{cid}/messages/{user['id']}/tokens").status_code == 422
    assert client.get(f"{LAB}/conversations/{cid}/messages/{'0' * 32}/tokens").status_code == 404
    assert client.get(f"{LAB}/conversations/nope/messages/{answer['id']}/tokens").status_code == 404


def test_answer_tokens_belong_to_their_owner(client):
    cid, messages = _conversation_with_answer(client)
    path = f"{LAB}/conversations/{cid}/messages/{messages[1]['id']}/tokens"
    assert client.get(path).status_code == 200
    browser_session(client)  # now the client is a browser session: another owner
    response = client.get(path)
    assert response.status_code == 404 and response.json()["detail"] == "conversation not found"


# --- embeddings --------------------------------------------------------------------------------


def test_embeddings_pca_of_known_vectors(client, gpt2_tok):
    words = ["cat", "dog", "car", "bus"]
    ids = [gpt2_tok.encode(" " + w) for w in words]
    assert all(len(i) == 1 for i in ids)
    # Write known vectors into the *served* model's embedding table: the answer can only
    # reflect them if the Lab measures the very model the app serves.
    table = served(client).model.tok_emb.weight
    known = torch.zeros(4, table.shape[1])
    known[0, 3], known[1, 3], known[2, 7], known[3, 7] = 10.0, -10.0, 2.0, -2.0
    with torch.no_grad():
        for (i,), vector in zip(ids, known):
            table[i] = vector
    body = client.post(f"{LAB}/embeddings", json={"words": words}).json()
    points = {p["word"]: p for p in body["points"]}
    assert [abs(points[w]["x"]) for w in words] == pytest.approx([10, 10, 0, 0], abs=1e-4)
    assert [abs(points[w]["y"]) for w in words] == pytest.approx([0, 0, 2, 2], abs=1e-4)
    assert points["cat"]["x"] == pytest.approx(-points["dog"]["x"])
    assert body["explained_variance"] == pytest.approx([200 / 208, 8 / 208], abs=1e-4)
    assert [points[w]["tokens"][0]["id"] for w in words] == [i[0] for i in ids]


def test_embeddings_average_the_tokens_of_a_word(client, gpt2_tok):
    from core.introspection import embedding_vectors, pca_2d

    words = ["Tokenization", "cat", "Kyoto", "dog"]
    body = client.post(f"{LAB}/embeddings", json={"words": words, "leading_space": False}).json()
    groups = [gpt2_tok.encode(w) for w in words]
    assert [[t["id"] for t in p["tokens"]] for p in body["points"]] == groups
    coords, _ = pca_2d(embedding_vectors(served(client).model, groups))
    got = torch.tensor([[p["x"], p["y"]] for p in body["points"]])
    assert torch.allclose(got.abs(), coords.abs(), atol=1e-4)  # PCA axes have no fixed sign


@pytest.mark.parametrize(
    ("words", "message"),
    [(["one"], "at least 2"), (["w"] * 41, "at most 40 items"), (["a", " "], "only whitespace"),
     (["a", "b" * 41], "at most 40 characters"), (["a", 3], "JSON string")],
)
def test_embeddings_limits(client, words, message):
    response = client.post(f"{LAB}/embeddings", json={"words": words})
    assert response.status_code == 422
    assert message in str(response.json()["detail"])


# --- classifier explanation -------------------------------------------------------------------


def test_explain_matches_the_classifier_and_attention_sums_to_one(client, gpt2_tok):
    text = "WINNER!! Claim your free prize now"
    body = client.post(f"{LAB}/explain", json={"text": text}).json()
    verdict = client.post("/api/v1/classify", json={"text": text}).json()
    assert body["label"] == verdict["label"]
    assert body["probabilities"]["spam"] == pytest.approx(verdict["spam_probability"], abs=1e-4)
    assert body["target"] == "spam" and body["truncated"] is False and body["threshold"] is None
    assert [t["token"]["id"] for t in body["tokens"]] == gpt2_tok.encode(text)
    assert math.isclose(sum(t["attention"] for t in body["tokens"]), 1.0, abs_tol=1e-3)
    # Words: "WINNER!!" is one (several tokens), then one per space-led token; each token carries its word's push.
    words = [t["word"] for t in body["tokens"]]
    assert words[0] == words[1] == 0 and words[-1] == len(text.split()) - 1
    by_word = {t["word"]: t["push"] for t in body["tokens"]}
    assert all(t["push"] == by_word[t["word"]] for t in body["tokens"])
    assert body["log_odds"] == pytest.approx(math.log(body["probabilities"]["spam"] / body["probabilities"]["ham"]), abs=1e-3)


def test_explain_push_is_what_classify_sees_without_the_word(client):
    """A push is the spam log-odds of the text minus those of the text without that word, both as
    /api/v1/classify reports them: the explanation is of the served verdict, not a second model."""
    words = ["Call", " now", " to", " claim"]
    body = client.post(f"{LAB}/explain", json={"text": "".join(words)}).json()
    pushes = [next(t["push"] for t in body["tokens"] if t["word"] == k) for k in range(len(words))]

    def log_odds(text: str) -> float:
        p = client.post("/api/v1/classify", json={"text": text}).json()["spam_probability"]
        return math.log(p / (1 - p))

    whole = log_odds("".join(words))
    for k, push in enumerate(pushes):
        assert push == pytest.approx(whole - log_odds("".join(words[:k] + words[k + 1 :])), abs=2e-3)


@pytest.fixture
def keyword_spam(tmp_path, gpt2_tok):
    """The service's classifier replaced by one whose spam words are known (tests/keyword_classifier.py)."""
    from keyword_classifier import save_keyword_classifier

    return save_keyword_classifier(tmp_path / "keyword-spam", gpt2_tok)


def test_explain_spam_words_push_towards_spam(make_settings, keyword_spam):
    path, spam_ids = keyword_spam
    with running_client(make_settings(chat_enabled=False, classifier_checkpoint=path)) as client:
        for text, label in (("Hi you won a FREE prize, claim it", "spam"),
                            ("see you at lunch then, bring a FREE book", "ham")):  # one spam word in eight: ham
            body = client.post(f"{LAB}/explain", json={"text": text}).json()
            assert body["label"] == label
            spammy = {t["word"] for t in body["tokens"] if t["token"]["id"] in spam_ids}
            assert spammy and len(spammy) < len(text.split())
            for t in body["tokens"]:
                assert (t["push"] > 0) == (t["word"] in spammy), t


def test_explain_and_classify_follow_the_stored_threshold(make_settings, keyword_spam, gpt2_tok, tmp_path):
    from core.weights.checkpoint import load_checkpoint, save_checkpoint

    path, _ = keyword_spam
    text = "see you at lunch then, bring a FREE book"
    ckpt = load_checkpoint(path)
    with running_client(make_settings(chat_enabled=False, classifier_checkpoint=path)) as client:
        p = client.post("/api/v1/classify", json={"text": text}).json()["spam_probability"]
    assert p < 0.5
    low = save_checkpoint(tmp_path / "low", ckpt.model, gpt2_tok, task="classification", labels=["ham", "spam"],
                          metadata={"name": "low", "threshold": p * 0.9})
    with running_client(make_settings(chat_enabled=False, classifier_checkpoint=low)) as client:
        verdict = client.post("/api/v1/classify", json={"text": text}).json()
        body = client.post(f"{LAB}/explain", json={"text": text}).json()
    assert verdict["label"] == body["label"] == "spam" and body["threshold"] == pytest.approx(p * 0.9)
    bad = save_checkpoint(tmp_path / "bad", ckpt.model, gpt2_tok, task="classification", labels=["ham", "spam"],
                          metadata={"name": "bad", "threshold": 1.5})
    with running_client(make_settings(chat_enabled=False, classifier_checkpoint=bad)) as client:
        slot = client.app.state.models.slots["classifier"]  # refused at load, not at each request
        assert slot.state == "error" and "not a probability in (0, 1)" in slot.detail


def test_explain_reads_what_the_classifier_reads(make_settings, gpt2_tok):
    with running_client(make_settings(chat_enabled=False, max_classify_chars=50)) as client:
        assert client.post(f"{LAB}/explain", json={"text": "x" * 51}).status_code == 422
        assert client.post(f"{LAB}/explain", json={"text": " "}).status_code == 422
    with running_client(make_settings(chat_enabled=False)) as client:
        # The tiny classifier reads its first 128 tokens, as /classify does.
        text = "free prize " * 100
        body = client.post(f"{LAB}/explain", json={"text": text}).json()
        assert [t["token"]["id"] for t in body["tokens"]] == gpt2_tok.encode(text)[:128]
        assert body["truncated"] is True


# --- pages, docs, threads ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/lab", "/lab/tokens", "/lab/attention", "/lab/next-token", "/lab/embeddings"])
def test_lab_pages_render_without_inline_scripts(client, path):
    page = client.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script>" not in page.text and "style=" not in page.text
    assert '<link rel="stylesheet" href="/static/css/lab.css' in page.text
    assert 'aria-current="page"' in page.text


def test_unknown_lab_page_is_404(client):
    assert client.get("/lab/nothing").status_code == 404


def test_lab_endpoints_are_documented(client):
    schema = client.get("/openapi.json").json()
    lab_paths = {p: ops for p, ops in schema["paths"].items() if p.startswith(LAB)}
    assert set(lab_paths) == {
        f"{LAB}/tokenize", f"{LAB}/merges", f"{LAB}/attention", f"{LAB}/next-token", f"{LAB}/embeddings",
        f"{LAB}/explain", f"{LAB}/conversations/{{conversation_id}}/messages/{{message_id}}/tokens",
        f"{LAB}/tokenizer-levels", f"{LAB}/few-shot",
    }
    for ops in lab_paths.values():
        for op in ops.values():
            assert {"200", "422", "503"} <= set(op["responses"]), op["operationId"]
    assert "/lab" not in schema["paths"]


def test_measurements_run_off_the_event_loop():
    from app.services.lab import LabRunner

    async def main() -> tuple[threading.Thread, threading.Thread]:
        runner = LabRunner()
        return threading.current_thread(), await runner.run(threading.current_thread)

    loop_thread, worker_thread = anyio.run(main)
    assert worker_thread is not loop_thread


def test_measurements_of_a_served_model_run_on_its_worker(client):
    """Issue 7: the Lab's heavy work runs in the model worker, in turn with chat and classification."""
    runner = client.app.state.lab
    chat, classifier = served(client), served(client, "classifier")

    def where(checkpoint) -> str:
        return threading.current_thread().name

    async def main() -> tuple[str, str, str]:
        plain = await runner.run(lambda: threading.current_thread().name)
        return await runner.run(where, chat), await runner.run(where, classifier), plain

    on_chat, on_classifier, plain = anyio.run(main)
    assert on_chat == "serving-engine" and on_classifier == "classifier-worker-classifier"
    assert not plain.startswith(("serving-engine", "classifier-worker"))  # no model read: a plain thread
    # An endpoint's measurement goes the same way and still answers.
    response = client.post(f"{LAB}/attention", json={"text": "Hello there", "layer": 0})
    assert response.status_code == 200, response.text
