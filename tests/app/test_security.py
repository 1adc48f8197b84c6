"""Security headers, request size limits, the docs page's CSP and API-key matching."""

from __future__ import annotations

import pytest

from app.security import SessionSigner, match_api_key

from app_testing import running_client


def test_security_headers_on_pages_api_and_errors(client):
    for path in ("/", "/spam", "/api/v1/conversations", "/nope", "/static/css/app.css"):
        response = client.get(path)
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-request-id"]


def test_pages_have_no_inline_scripts_or_styles(client):
    import re

    for path in ("/", "/spam"):
        html = client.get(path).text
        scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S)
        assert scripts and all('src="/static/' in attrs and not body.strip() for attrs, body in scripts)
        assert not re.search(r"\son[a-z]+\s*=", html)  # no inline event handlers
        assert "style=" not in html and "<style" not in html


def test_docs_page_allows_exactly_its_own_inline_script(client):
    response = client.get("/docs")
    assert response.status_code == 200
    csp = response.headers["content-security-policy"]
    assert "'sha256-" in csp and "unsafe-inline" not in csp
    assert client.get("/openapi.json").json()["info"]["title"] == "scratchgpt"


def test_request_body_limit(make_settings):
    with running_client(make_settings(max_request_bytes=2048, chat_enabled=False)) as client:
        big = client.post("/api/v1/classify", json={"text": "x" * 5000})
        assert big.status_code == 413 and "too large" in big.json()["detail"]

        def chunks():
            for _ in range(10):
                yield b"x" * 500  # no Content-Length: the limit is counted as the body streams in

        streamed = client.post("/api/v1/classify", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert client.post("/api/v1/classify", json={"text": "small"}).status_code == 200


def test_api_key_matching():
    keys = {"alice": "a" * 20, "bob": "b" * 20}
    assert match_api_key("a" * 20, keys) == "alice"
    assert match_api_key("b" * 20, keys) == "bob"
    assert match_api_key("a" * 19, keys) is None
    assert match_api_key("", keys) is None


def test_session_signing():
    signer = SessionSigner(b"k" * 32)
    sid, cookie = signer.new_session()
    assert signer.verify(cookie) == sid
    assert signer.verify(cookie + "x") is None
    assert SessionSigner(b"j" * 32).verify(cookie) is None  # another server's key
    assert signer.check_csrf(sid, signer.csrf_token(sid))
    assert not signer.check_csrf(sid, signer.csrf_token(sid + "x"))
    assert not signer.check_csrf(sid, None)


def test_short_api_keys_are_refused():
    from app.settings import Settings

    with pytest.raises(ValueError, match="shorter than 16"):
        Settings(api_keys={"alice": "short"})
    assert set(Settings(api_keys="alice:0123456789abcdef,bob:fedcba9876543210").api_keys) == {"alice", "bob"}


def test_secret_key_persists_across_restarts(make_settings):
    settings = make_settings(chat_enabled=False, classifier_enabled=False)
    with running_client(settings) as client:
        client.get("/")
        cookie = client.cookies.get("scratchgpt_session")
    assert (settings.home / "secret_key").stat().st_mode & 0o077 == 0  # readable by the owner only
    with running_client(settings) as client:
        client.cookies.clear()
        client.cookies.set("scratchgpt_session", cookie)
        assert client.get("/api/v1/conversations").status_code == 200  # the same browser is the same owner
