"""With API keys configured, keys protect everything: a browser signs in with a key and is then that
key's user (the same conversations as its API calls); an anonymous cookie opens nothing; /metrics
and the details of /ready are for keys unless a setting opens them. Without keys all stays open."""

from __future__ import annotations

import re

from app_testing import browser_session, running_client

ALICE = "alice-key-0123456789abcdef"


def sign_in(client, key: str, next_path: str = "/"):
    page = client.get(f"/login?next={next_path}")
    assert page.status_code == 200
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return client.post("/login", content=f"key={key}&csrf_token={csrf}&next={next_path}",
                       headers={"Content-Type": "application/x-www-form-urlencoded"}, follow_redirects=False)


def test_a_cookie_from_a_page_no_longer_opens_the_api(make_settings):
    """The attack of issue 21: take a cookie from /spam, read the CSRF token, use the API without a key."""
    with running_client(make_settings(api_keys={"alice": ALICE}, chat_enabled=False)) as client:
        page = client.get("/spam", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/spam"
        csrf = browser_session(client, follow_sign_in=True)  # the sign-in page still hands out a session
        refused = client.post("/api/v1/classify", json={"text": "x"}, headers={"X-CSRF-Token": csrf})
        assert refused.status_code == 401 and "/login" in refused.json()["detail"]
        assert client.get("/api/v1/conversations").status_code == 401


def test_signing_in_makes_the_browser_the_keys_user(make_settings):
    with running_client(make_settings(api_keys={"alice": ALICE}, chat_enabled=False)) as client:
        wrong = sign_in(client, "not-a-key-at-all-000000")
        assert wrong.status_code == 401 and "not one of this server" in wrong.text
        assert ALICE not in wrong.text
        signed_in = sign_in(client, ALICE, "/spam")
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/spam"
        page = client.get("/spam")
        assert page.status_code == 200
        csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text).group(1)
        created = client.post("/api/v1/conversations", json={"title": "from the browser"},
                              headers={"X-CSRF-Token": csrf})
        assert created.status_code == 201
        assert client.post("/api/v1/classify", json={"text": "hi"}, headers={"X-CSRF-Token": csrf}).status_code == 200
        # The same user through the API with the key sees what the browser made.
        client.cookies.clear()
        listed = client.get("/api/v1/conversations", headers={"Authorization": f"Bearer {ALICE}"}).json()
        assert [c["title"] for c in listed["conversations"]] == ["from the browser"]


def test_sign_in_never_sends_the_browser_to_another_site(make_settings):
    with running_client(make_settings(api_keys={"alice": ALICE}, chat_enabled=False)) as client:
        for target in ("//evil.example/x", "https://evil.example/", "javascript:alert(1)"):
            assert sign_in(client, ALICE, target).headers["location"] == "/"


def test_metrics_and_ready_details_are_for_keys_unless_opened(make_settings):
    with running_client(make_settings(api_keys={"alice": ALICE}, chat_enabled=False)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": f"Bearer {ALICE}"}).status_code == 200
        ready = client.get("/ready").json()
        assert all(set(info) == {"state"} for info in ready["models"].values())  # no paths, no errors
    with running_client(make_settings(api_keys={"alice": ALICE}, chat_enabled=False,
                                      public_service_details=True)) as client:
        assert client.get("/metrics").status_code == 200
        assert "path" in client.get("/ready").json()["models"]["classifier"]


def test_without_keys_everything_stays_open(make_settings):
    with running_client(make_settings(chat_enabled=False)) as client:
        assert client.get("/", follow_redirects=False).status_code == 200
        assert client.get("/metrics").status_code == 200
        assert "path" in client.get("/ready").json()["models"]["classifier"]
        assert sign_in(client, "anything-at-all-000000").status_code == 400
