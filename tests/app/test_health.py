"""Liveness, readiness, and a missing checkpoint disabling only its own endpoints."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.main import create_app

from app_testing import running_client


def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True and body["loading"] == []
    assert body["models"]["chat"]["state"] == "ready"
    assert body["models"]["chat"]["name"] == "tiny-chat"
    assert body["models"]["classifier"]["state"] == "ready"
    assert body["models"]["chat"]["load_seconds"] >= 0


def test_ready_is_503_listing_models_still_loading(make_settings):
    # Before the lifespan has loaded anything, every model is "loading".
    app = create_app(make_settings())
    client = TestClient(app)  # not entered: no lifespan, nothing loads
    response = client.get("/ready")
    assert response.status_code == 503
    assert sorted(response.json()["loading"]) == ["chat", "classifier"]
    assert client.get("/health").status_code == 200
    loading = client.post("/api/v1/classify", json={"text": "hi"})
    assert loading.status_code == 503 and "loading" in loading.json()["detail"]
    assert loading.headers["retry-after"] == "5"


def test_missing_checkpoints_disable_only_their_endpoints(make_settings, tmp_path):
    settings = make_settings(chat_checkpoint=tmp_path / "nope-chat", classifier_checkpoint=tmp_path / "nope-spam")
    with running_client(settings) as client:
        ready = client.get("/ready")
        assert ready.status_code == 200  # nothing is loading any more; the service is up
        models = ready.json()["models"]
        assert models["chat"]["state"] == "missing"
        assert models["chat"]["make_with"] == "scratchgpt download smollm2-135m-instruct"
        assert models["classifier"]["make_with"] == "scratchgpt finetune spam"

        spam = client.post("/api/v1/classify", json={"text": "win a prize"})
        assert spam.status_code == 503
        assert "scratchgpt finetune spam" in spam.json()["detail"]

        conversation = client.post("/api/v1/conversations", json={}).json()  # the database side works
        chat = client.post(f"/api/v1/conversations/{conversation['id']}/messages", json={"content": "hi"})
        assert chat.status_code == 503
        assert "scratchgpt download smollm2-135m-instruct" in chat.json()["detail"]
        assert client.get(f"/api/v1/conversations/{conversation['id']}").json()["messages"] == []

        hi = [{"role": "user", "content": "hi"}]
        openai = client.post("/v1/chat/completions", json={"model": "nope-chat", "messages": hi})
        assert openai.status_code == 503 and "scratchgpt download" in openai.json()["error"]["message"]
        assert openai.headers["retry-after"] == "60"  # a checkpoint still to be made: minutes, not seconds
        unknown = client.post("/v1/chat/completions", json={"model": "x", "messages": hi})
        assert unknown.status_code == 404 and "'nope-chat'" in unknown.json()["error"]["message"]
        assert [(m["id"], m["state"]) for m in client.get("/v1/models").json()["data"]] == [("nope-chat", "missing")]
        assert client.get("/").status_code == 200


def test_a_broken_checkpoint_is_an_error_state_not_a_crash(make_settings, tmp_path, chat_checkpoint):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(chat_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with running_client(make_settings(chat_checkpoint=broken)) as client:
        chat = client.get("/ready").json()["models"]["chat"]
        assert chat["state"] == "error"
        assert "model.safetensors" in chat["detail"]
        assert client.get("/ready").json()["models"]["classifier"]["state"] == "ready"
        conversation = client.post("/api/v1/conversations", json={}).json()
        response = client.post(f"/api/v1/conversations/{conversation['id']}/messages", json={"content": "hi"})
        assert response.status_code == 503 and "corrupt" in response.json()["detail"]


def test_wrong_kind_of_checkpoint_is_reported(make_settings, classifier_checkpoint, chat_checkpoint):
    settings = make_settings(chat_checkpoint=classifier_checkpoint, classifier_checkpoint=chat_checkpoint)
    with running_client(settings) as client:
        models = client.get("/ready").json()["models"]
        assert models["chat"]["state"] == "error" and "causal-lm" in models["chat"]["detail"]
        assert models["classifier"]["state"] == "error" and "classification" in models["classifier"]["detail"]
