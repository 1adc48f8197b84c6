"""Conversations CRUD, validation, owners (API keys, browser sessions) and CSRF."""

from __future__ import annotations

import pytest

from app_testing import browser_session, running_client

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef00"


def test_create_read_update_delete(client):
    created = client.post("/api/v1/conversations", json={"title": "Trip", "temperature": 0.2, "top_k": 5})
    assert created.status_code == 201
    c = created.json()
    assert c["title"] == "Trip" and c["temperature"] == 0.2 and c["top_k"] == 5
    assert c["model"] == "tiny-chat"
    assert c["system_prompt"] == "You are a helpful assistant."  # service default

    listed = client.get("/api/v1/conversations").json()
    assert listed["total"] == 1 and listed["conversations"][0]["id"] == c["id"]

    patched = client.patch(f"/api/v1/conversations/{c['id']}", json={"title": "  Trip   to Rome ", "top_k": None})
    assert patched.status_code == 200
    assert patched.json()["title"] == "Trip to Rome" and patched.json()["top_k"] is None
    assert patched.json()["temperature"] == 0.2  # untouched fields stay

    detail = client.get(f"/api/v1/conversations/{c['id']}").json()
    assert detail["messages"] == [] and detail["generating"] is False

    assert client.delete(f"/api/v1/conversations/{c['id']}").status_code == 204
    assert client.get(f"/api/v1/conversations/{c['id']}").status_code == 404
    assert client.get("/api/v1/conversations").json()["total"] == 0


def test_list_is_most_recent_first(client):
    ids = [client.post("/api/v1/conversations", json={"title": f"c{i}"}).json()["id"] for i in range(3)]
    client.patch(f"/api/v1/conversations/{ids[0]}", json={"title": "touched"})
    listed = [c["id"] for c in client.get("/api/v1/conversations").json()["conversations"]]
    assert listed == [ids[0], ids[2], ids[1]]
    assert len(client.get("/api/v1/conversations?limit=1").json()["conversations"]) == 1


@pytest.mark.parametrize(
    "payload",
    [
        {"title": None},
        {"temperature": None},
        {"temperature": 2.5},
        {"temperature": "0.5"},
        {"top_p": 0},
        {"top_k": 0},
        {"top_k": True},
        {"max_new_tokens": 0},
        {"max_new_tokens": 1.5},
        {"title": ""},
        {"unknown": 1},
    ],
)
def test_invalid_updates_are_422(client, payload):
    c = client.post("/api/v1/conversations", json={}).json()
    response = client.patch(f"/api/v1/conversations/{c['id']}", json=payload)
    assert response.status_code == 422, payload


def test_max_new_tokens_cap(make_settings):
    with running_client(make_settings(max_new_tokens_cap=64, chat_enabled=False, classifier_enabled=False)) as client:
        too_many = client.post("/api/v1/conversations", json={"max_new_tokens": 65})
        assert too_many.status_code == 422 and "64" in too_many.json()["detail"]
        ok = client.post("/api/v1/conversations", json={"max_new_tokens": 64})
        assert ok.status_code == 201


def conversation_routes(cid: str) -> list[tuple[str, str, dict | None]]:
    return [
        ("GET", f"/api/v1/conversations/{cid}", None),
        ("PATCH", f"/api/v1/conversations/{cid}", {"title": "mine now"}),
        ("DELETE", f"/api/v1/conversations/{cid}", None),
        ("GET", f"/api/v1/conversations/{cid}/messages", None),
        ("POST", f"/api/v1/conversations/{cid}/messages", {"content": "hi"}),
        ("POST", f"/api/v1/conversations/{cid}/regenerate", {}),
        ("POST", f"/api/v1/conversations/{cid}/stop", None),
    ]


def test_every_conversation_route_is_404_for_another_api_key_user(make_settings):
    settings = make_settings(api_keys={"alice": ALICE, "bob": BOB})
    with running_client(settings) as client:
        alice = {"Authorization": f"Bearer {ALICE}"}
        bob = {"X-API-Key": BOB}
        c = client.post("/api/v1/conversations", json={"title": "alice's"}, headers=alice).json()
        client.post(f"/api/v1/conversations/{c['id']}/messages", json={"content": "secret"}, headers=alice).read()
        for method, path, body in conversation_routes(c["id"]):
            response = client.request(method, path, json=body, headers=bob)
            assert response.status_code == 404, (method, path)
            assert response.json() == {"detail": "conversation not found"}
        assert client.get("/api/v1/conversations", headers=bob).json()["total"] == 0
        # Nothing bob did changed alice's conversation.
        mine = client.get(f"/api/v1/conversations/{c['id']}", headers=alice).json()
        assert mine["title"] == "alice's" and [m["role"] for m in mine["messages"]] == ["user", "assistant"]


def test_every_conversation_route_is_404_for_another_browser_session(make_settings):
    with running_client(make_settings()) as first:
        csrf = browser_session(first)
        c = first.post("/api/v1/conversations", json={}, headers={"X-CSRF-Token": csrf}).json()
        second = type(first)(first.app)  # a second browser: its own cookie jar
        csrf2 = browser_session(second)
        for method, path, body in conversation_routes(c["id"]):
            response = second.request(method, path, json=body, headers={"X-CSRF-Token": csrf2})
            assert response.status_code == 404, (method, path)
        assert first.get(f"/api/v1/conversations/{c['id']}").status_code == 200
        # The anonymous local owner (no cookie) does not see browser conversations either.
        first.cookies.clear()
        assert first.get(f"/api/v1/conversations/{c['id']}").status_code == 404


def test_api_keys_required_when_configured(make_settings):
    with running_client(make_settings(api_keys={"alice": ALICE}, chat_enabled=False)) as client:
        missing = client.get("/api/v1/conversations")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        wrong = client.get("/api/v1/conversations", headers={"Authorization": "Bearer " + "x" * len(ALICE)})
        assert wrong.status_code == 401 and wrong.json()["detail"] == "invalid API key"
        assert ALICE not in wrong.text
        assert client.post("/api/v1/classify", json={"text": "hi"}).status_code == 401
        assert client.post("/api/v1/classify", json={"text": "hi"}, headers={"X-API-Key": ALICE}).status_code == 200
        # A browser session opens nothing until it signs in with a key (tests/app/test_sign_in.py).
        csrf = browser_session(client, follow_sign_in=True)
        assert client.post("/api/v1/classify", json={"text": "hi"}, headers={"X-CSRF-Token": csrf}).status_code == 401


def test_cookie_changes_need_the_csrf_token(client):
    csrf = browser_session(client)
    no_token = client.post("/api/v1/conversations", json={})
    assert no_token.status_code == 403 and "CSRF" in no_token.json()["detail"]
    wrong = client.post("/api/v1/conversations", json={}, headers={"X-CSRF-Token": csrf[:-2] + "xx"})
    assert wrong.status_code == 403
    ok = client.post("/api/v1/conversations", json={}, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 201
    assert client.get("/api/v1/conversations").status_code == 200  # reads need no token
    assert client.post("/api/v1/classify", json={"text": "hi"}).status_code == 403


def test_tampered_session_cookie_is_rejected(client):
    browser_session(client)
    cookie = client.cookies.get("scratchgpt_session")
    session_id, mac = cookie.split(".")
    client.cookies.clear()
    client.cookies.set("scratchgpt_session", f"{session_id}x.{mac}")
    assert client.get("/api/v1/conversations").status_code == 401
    # Visiting a page again issues a fresh, valid session.
    client.cookies.clear()
    browser_session(client)
    assert client.get("/api/v1/conversations").status_code == 200


def test_session_cookie_flags(client):
    page = client.get("/")
    cookie = page.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/" in cookie
    # A second visit keeps the same session (no new cookie).
    assert "set-cookie" not in client.get("/spam").headers
