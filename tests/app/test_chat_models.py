"""Several chat models in one service (issue 20): side by side, picked per conversation and per /v1
request, each with its decoding defaults from its checkpoint's metadata, penalties kept per
conversation, and a checkpoint put into service without a restart (``ModelRegistry.load_model``).

Two tiny real chat models with different random weights: what one answers greedily the other does
not, so an answer shows which model wrote it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from app_testing import parse_sse, running_client
from chat_models_testing import SECOND, SECOND_DEFAULTS, expected_answer, second_chat

from app.services.registry import generation_defaults
from app.settings import Settings

PROMPT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory, gpt2_tok) -> Path:
    return second_chat(tmp_path_factory.mktemp("ckpt") / SECOND, gpt2_tok)


@pytest.fixture
def two(make_settings, chat_checkpoint, second_checkpoint):
    """Both chat models served, tiny-chat first (the default)."""
    with running_client(make_settings(chat_models=[str(chat_checkpoint), str(second_checkpoint)])) as client:
        yield client


def stream(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        return list(parse_sse(response.iter_lines()))


def v1(client, model: str, **extra):
    return client.post("/v1/chat/completions", json={"model": model, "messages": PROMPT, "max_tokens": 10, **extra})


# --- settings ---------------------------------------------------------------------------------


def test_chat_models_setting_reads_paths_and_named_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCHGPT_CHAT_MODELS", f"{tmp_path}/a, mine={tmp_path}/b")
    assert Settings(home=tmp_path).chat_model_entries() == [(None, tmp_path / "a"), ("mine", tmp_path / "b")]
    monkeypatch.delenv("SCRATCHGPT_CHAT_MODELS")
    # Unset: our instruction-tuned model first, then the released one; the older one-model setting still works.
    assert [p.name for _, p in Settings(home=tmp_path).chat_model_entries()] == ["smollm2-135m-chat",
                                                                                 "smollm2-135m-instruct"]
    assert Settings(home=tmp_path, chat_checkpoint=tmp_path / "c").chat_model_entries() == [(None, tmp_path / "c")]
    for bad, says in [(f"{tmp_path}/m,{tmp_path}/x/m", "twice"), ("a b=/x", "name=folder"), ("a=", "folder")]:
        monkeypatch.setenv("SCRATCHGPT_CHAT_MODELS", bad)
        with pytest.raises(ValueError, match=says):
            Settings(home=tmp_path)


def test_decoding_defaults_outside_the_api_limits_are_left_out():
    found = generation_defaults({"generation_defaults": {"temperature": 9, "top_k": 5, "top_p": None,
                                                         "presence_penalty": "high", "beam_width": 4}})
    assert found == {"top_k": 5, "top_p": None}
    assert generation_defaults({}) == {} and generation_defaults({"generation_defaults": [1]}) == {}


# --- side by side -----------------------------------------------------------------------------


def test_two_chat_models_are_served_side_by_side(two):
    ready = two.get("/ready").json()
    assert ready["ready"] is True
    assert ready["models"]["chat"]["name"] == "tiny-chat" and ready["models"]["chat"]["default"] is True
    assert ready["models"][f"chat:{SECOND}"]["state"] == "ready"
    assert ready["models"][f"chat:{SECOND}"]["generation_defaults"] == SECOND_DEFAULTS
    registry = two.app.state.models
    first, second = registry.chat["tiny-chat"], registry.chat[SECOND]
    assert first.worker is not second.worker and first.decoder is not second.decoder

    listed = two.get("/api/v1/models").json()
    assert listed["default"] == "tiny-chat"
    assert [(m["name"], m["state"], m["default"]) for m in listed["models"]] == [
        ("tiny-chat", "ready", True), (SECOND, "ready", False)]
    settings = two.app.state.settings
    assert listed["models"][0]["decoding"] == {
        "temperature": settings.default_temperature, "top_k": settings.default_top_k,
        "top_p": settings.default_top_p, "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}
    assert listed["models"][1]["decoding"] == {
        "temperature": 0.0, "top_k": None, "top_p": settings.default_top_p, "repetition_penalty": 1.3,
        "frequency_penalty": 0.0, "presence_penalty": 0.0}

    data = two.get("/v1/models").json()["data"]
    assert [(m["id"], m["state"]) for m in data] == [("tiny-chat", "ready"), (SECOND, "ready")]

    metrics = two.get("/metrics").text
    assert f'scratchgpt_model_ready{{model="chat:{SECOND}"}} 1.0' in metrics
    assert 'scratchgpt_model_ready{model="chat"} 1.0' in metrics


def test_a_conversation_keeps_its_model_and_every_answer_comes_from_it(two, chat_checkpoint, second_checkpoint):
    settings = {"system_prompt": "", "temperature": 0.0, "top_k": None, "top_p": None, "max_new_tokens": 12}
    chosen = two.post("/api/v1/conversations", json={"model": SECOND, **settings}).json()
    default = two.post("/api/v1/conversations", json=settings).json()
    assert (chosen["model"], default["model"]) == (SECOND, "tiny-chat")
    assert two.get(f"/api/v1/conversations/{chosen['id']}").json()["model"] == SECOND

    greedy = dict(temperature=0.0, top_k=None, top_p=None)
    turns = [{"role": "user", "content": "Name a colour."}]
    answers = {}
    for conversation, checkpoint in ((chosen, second_checkpoint), (default, chat_checkpoint)):
        events = stream(two, f"/api/v1/conversations/{conversation['id']}/messages", {"content": turns[0]["content"]})
        assert events[0][1]["model"] == conversation["model"]
        answers[conversation["model"]] = text = events[-1][1]["message"]["content"]
        # The second model's conversation has its default repetition penalty (1.3), the first none.
        assert text == expected_answer(checkpoint, "", turns, 12, **greedy,
                                       repetition_penalty=conversation["repetition_penalty"])
    assert answers[SECOND] != answers["tiny-chat"]  # the two models do answer differently

    # The second turn, and a regenerated answer, come from the conversation's model too.
    history = [*turns, {"role": "assistant", "content": answers[SECOND]}, {"role": "user", "content": "Another."}]
    second_turn = stream(two, f"/api/v1/conversations/{chosen['id']}/messages", {"content": "Another."})
    assert second_turn[-1][1]["message"]["content"] == expected_answer(second_checkpoint, "", history, 12, **greedy,
                                                                       repetition_penalty=1.3)
    again = stream(two, f"/api/v1/conversations/{chosen['id']}/regenerate", {})
    assert again[0][1]["model"] == SECOND
    assert again[-1][1]["message"]["content"] == second_turn[-1][1]["message"]["content"]


def test_an_unknown_model_is_refused_with_the_served_names(two):
    created = two.post("/api/v1/conversations", json={"model": "gpt-4"})
    assert created.status_code == 404
    assert "'gpt-4'" in created.json()["detail"] and f"'{SECOND}'" in created.json()["detail"]
    unknown = v1(two, "gpt-4")
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'tiny-chat'" in error["message"] and f"'{SECOND}'" in error["message"]
    assert two.post("/api/v1/lab/attention?model=gpt-4", json={"text": "hi"}).status_code == 404


def test_a_conversation_whose_model_is_no_longer_served_says_so(two):
    from app.db import crud

    cid = two.post("/api/v1/conversations", json={}).json()["id"]
    with two.app.state.sessions() as session:
        crud.update_conversation(session, crud.get_conversation(session, "local", cid), {"model": "retired-model"})
    response = two.post(f"/api/v1/conversations/{cid}/messages", json={"content": "hi"})
    assert response.status_code == 503
    assert "'retired-model'" in response.json()["detail"] and "start a new chat" in response.json()["detail"]
    assert two.get(f"/api/v1/conversations/{cid}").json()["messages"] == []


# --- /v1 ---------------------------------------------------------------------------------------


def test_v1_model_field_picks_the_model(two, chat_checkpoint, second_checkpoint):
    for name, checkpoint in (("tiny-chat", chat_checkpoint), (SECOND, second_checkpoint)):
        body = v1(two, name, temperature=0, top_p=1, repetition_penalty=1.0).json()
        assert body["model"] == name
        assert body["choices"][0]["message"]["content"] == expected_answer(
            checkpoint, "", PROMPT, 10, temperature=0.0, top_k=None, top_p=None)


def test_v1_takes_the_models_decoding_defaults_for_what_a_request_leaves_out(two, second_checkpoint):
    # The second model's defaults: greedy, with a repetition penalty of 1.3.
    left_out = v1(two, SECOND).json()["choices"][0]["message"]["content"]
    assert left_out == expected_answer(second_checkpoint, "", PROMPT, 10, temperature=0.0, top_k=None, top_p=None,
                                       repetition_penalty=1.3)
    without_penalty = v1(two, SECOND, repetition_penalty=1.0).json()["choices"][0]["message"]["content"]
    assert without_penalty == expected_answer(second_checkpoint, "", PROMPT, 10, temperature=0.0, top_k=None,
                                              top_p=None)
    assert left_out != without_penalty  # the default penalty was applied, not just the temperature


# --- conversations: defaults and penalties -------------------------------------------------------


def test_a_new_conversation_takes_its_models_defaults_and_keeps_penalties(two, second_checkpoint):
    created = two.post("/api/v1/conversations", json={"model": SECOND}).json()
    assert (created["temperature"], created["top_k"], created["repetition_penalty"]) == (0.0, None, 1.3)
    assert (created["frequency_penalty"], created["presence_penalty"]) == (0.0, 0.0)
    own = two.post("/api/v1/conversations", json={"model": SECOND, "temperature": 0.5, "repetition_penalty": 1.1,
                                                  "frequency_penalty": 0.4, "presence_penalty": -0.2}).json()
    assert (own["temperature"], own["repetition_penalty"], own["frequency_penalty"], own["presence_penalty"]) == (
        0.5, 1.1, 0.4, -0.2)

    cid = created["id"]
    changed = two.patch(f"/api/v1/conversations/{cid}", json={"repetition_penalty": 1.0, "presence_penalty": 0.6})
    assert changed.status_code == 200
    stored = two.get(f"/api/v1/conversations/{cid}").json()
    assert (stored["repetition_penalty"], stored["frequency_penalty"], stored["presence_penalty"]) == (1.0, 0.0, 0.6)
    for bad in ({"repetition_penalty": 3}, {"frequency_penalty": -2.5}, {"presence_penalty": None},
                {"repetition_penalty": "1.2"}):
        assert two.patch(f"/api/v1/conversations/{cid}", json=bad).status_code == 422, bad
    assert two.post("/api/v1/conversations", json={"frequency_penalty": 7}).status_code == 422

    # The stored penalties decode its answers.
    two.patch(f"/api/v1/conversations/{cid}", json={"system_prompt": "", "max_new_tokens": 12, "top_p": None})
    events = stream(two, f"/api/v1/conversations/{cid}/messages", {"content": "Name a colour."})
    assert events[-1][1]["message"]["content"] == expected_answer(
        second_checkpoint, "", PROMPT, 12, temperature=0.0, top_k=None, top_p=None, presence_penalty=0.6)


# --- the Lab ----------------------------------------------------------------------------------


def test_the_lab_inspects_the_model_asked_for_or_the_conversations(two):
    assert two.post("/api/v1/lab/attention", json={"text": "hi there"}).json()["model"] == "tiny-chat"
    assert two.post(f"/api/v1/lab/attention?model={SECOND}", json={"text": "hi there"}).json()["model"] == SECOND
    nxt = two.post(f"/api/v1/lab/next-token?model={SECOND}", json={"text": "The"}).json()
    assert nxt["model"] == SECOND
    tokenizers = two.post(f"/api/v1/lab/tokenize?model={SECOND}", json={"text": "hi"}).json()["tokenizers"]
    assert tokenizers[1]["name"].startswith(SECOND)

    cid = two.post("/api/v1/conversations", json={"model": SECOND, "max_new_tokens": 4}).json()["id"]
    answer = stream(two, f"/api/v1/conversations/{cid}/messages", {"content": "hi"})[-1][1]["message"]
    tokens = two.get(f"/api/v1/lab/conversations/{cid}/messages/{answer['id']}/tokens").json()
    assert tokens["model"] == SECOND


# --- putting a checkpoint into service without a restart ---------------------------------------------


def test_load_model_serves_a_checkpoint_made_while_the_service_runs(make_settings, chat_checkpoint,
                                                                     second_checkpoint, tmp_path):
    made_later = tmp_path / "models" / "smollm2-135m-chat"
    settings = make_settings(chat_models=[str(made_later), str(chat_checkpoint)])
    with running_client(settings) as client:
        registry = client.app.state.models
        models = client.get("/ready").json()["models"]
        # Missing is a state, not an error: the service is ready with the other model, the default.
        assert models["chat"]["name"] == "tiny-chat"
        assert models["chat:smollm2-135m-chat"]["state"] == "missing"
        assert models["chat:smollm2-135m-chat"]["make_with"] == f"scratchgpt finetune instruct --out {made_later}"
        waiting = client.post("/api/v1/conversations", json={"model": "smollm2-135m-chat", "max_new_tokens": 4,
                                                              "temperature": 0.0}).json()
        refused = client.post(f"/api/v1/conversations/{waiting['id']}/messages", json={"content": "hi"})
        assert refused.status_code == 503 and "scratchgpt finetune instruct" in refused.json()["detail"]
        assert v1(client, "smollm2-135m-chat").headers["retry-after"] == "60"

        shutil.copytree(second_checkpoint, made_later)  # the fine-tuning job finishes
        slot = asyncio.run(registry.load_model("chat", made_later))
        assert (slot.name, slot.state) == ("smollm2-135m-chat", "ready")
        assert slot.defaults == SECOND_DEFAULTS
        # The first of the list that is ready is the default for new conversations now.
        assert client.get("/api/v1/models").json()["default"] == "smollm2-135m-chat"
        assert client.post("/api/v1/conversations", json={}).json()["model"] == "smollm2-135m-chat"
        events = stream(client, f"/api/v1/conversations/{waiting['id']}/messages", {"content": "hi"})
        assert events[0][1]["model"] == "smollm2-135m-chat" and events[-1][0] == "done"
        assert v1(client, "smollm2-135m-chat").status_code == 200

        # A new checkpoint for a model already serving replaces it; the old engine stops after its answers.
        old = registry.chat["tiny-chat"]
        replaced = asyncio.run(registry.load_model("chat", second_checkpoint, name="tiny-chat"))
        assert registry.chat["tiny-chat"] is replaced and replaced.path == second_checkpoint
        assert v1(client, "tiny-chat", temperature=0, repetition_penalty=1.0).json()["choices"][0]["message"]["content"] == expected_answer(
            second_checkpoint, "", PROMPT, 10, temperature=0.0, top_k=None, top_p=None)
        from waiting import wait_until

        wait_until(lambda: old.worker.engine._thread is None or not old.worker.engine._thread.is_alive(),
                   "the replaced engine's stop")


def test_load_model_adds_a_new_chat_model_and_the_classifier(make_settings, chat_checkpoint, classifier_checkpoint,
                                                             second_checkpoint, tmp_path):
    with running_client(make_settings(classifier_checkpoint=tmp_path / "no-spam")) as client:
        registry = client.app.state.models
        assert client.post("/api/v1/classify", json={"text": "win"}).status_code == 503
        asyncio.run(registry.load_model("classifier", classifier_checkpoint))
        assert client.post("/api/v1/classify", json={"text": "win"}).json()["label"] in ("spam", "ham")

        added = asyncio.run(registry.load_model("chat", second_checkpoint))  # named by its checkpoint
        assert added.name == SECOND and list(registry.chat) == ["tiny-chat", SECOND]
        assert client.get("/api/v1/models").json()["default"] == "tiny-chat"  # the first that is ready still
        assert v1(client, SECOND).status_code == 200


def test_load_model_failures_keep_the_service_as_it_was(make_settings, chat_checkpoint, classifier_checkpoint,
                                                        tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(chat_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    made_later = tmp_path / "later"
    with running_client(make_settings(chat_models=[str(chat_checkpoint), f"later={made_later}"])) as client:
        registry = client.app.state.models
        with pytest.raises(Exception, match="model.safetensors"):
            asyncio.run(registry.load_model("chat", broken, name="tiny-chat"))
        assert registry.chat["tiny-chat"].path == chat_checkpoint and v1(client, "tiny-chat").status_code == 200

        with pytest.raises(Exception, match="config.json"):
            asyncio.run(registry.load_model("chat", tmp_path / "nothing", name="later"))
        with pytest.raises(Exception, match="model.safetensors"):
            asyncio.run(registry.load_model("chat", broken, name="later"))
        later = client.get("/ready").json()["models"]["chat:later"]
        assert later["state"] == "error" and "model.safetensors" in later["detail"]  # was missing: now says why

        with pytest.raises(Exception, match="classification"):  # a chat checkpoint is no spam classifier
            asyncio.run(registry.load_model("classifier", chat_checkpoint))
        assert client.post("/api/v1/classify", json={"text": "win"}).status_code == 200
        with pytest.raises(ValueError, match="role"):
            registry.load_model_now("embedder", chat_checkpoint)


def test_names_from_metadata_must_not_collide(make_settings, chat_checkpoint, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(chat_checkpoint, twin)  # a different folder with the same checkpoint name
    config = json.loads((twin / "config.json").read_text())
    assert config["metadata"]["name"] == "tiny-chat"
    from app.main import create_app

    with pytest.raises(ValueError, match="name them"):
        create_app(make_settings(chat_models=[str(chat_checkpoint), str(twin)]))
    app = create_app(make_settings(chat_models=[str(chat_checkpoint), f"twin={twin}"]))
    assert list(app.state.models.chat) == ["tiny-chat", "twin"]
