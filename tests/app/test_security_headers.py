"""What tests/app/test_security.py leaves out: keys compared in constant time and never logged,
CSRF on every cookie-authenticated change (read from the OpenAPI document), and the security
headers on every kind of response, the Lab's pages and streams included.
"""

from __future__ import annotations

import hmac
import logging
import re

import httpx
import pytest

import app.security
from app.api.routes.lab import LAB_PAGES
from app.logs import JsonFormatter
from app.security import match_api_key

from app_testing import LiveServer, browser_session, parse_sse, running_client

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef00"
CAROL = "carol-key-0123456789abcdef"

PAGES = ["/", "/spam", "/lab", *(f"/lab/{name}" for name in LAB_PAGES)]


# --- API keys ---------------------------------------------------------------------


@pytest.fixture
def counted_compare(monkeypatch):
    """hmac.compare_digest as app.security calls it, counting the calls and the lengths compared."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def compare(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(app.security.hmac, "compare_digest", compare)
    return calls


@pytest.mark.parametrize("presented", [ALICE, CAROL, "x" * len(ALICE), ALICE[:-1], ""])
def test_every_key_is_compared_whichever_matches(counted_compare, presented):
    """No early exit: a right first key, a right last key and a wrong key cost the same comparisons."""
    keys = {"alice": ALICE, "bob": BOB, "carol": CAROL}
    expected = {ALICE: "alice", CAROL: "carol"}.get(presented)
    assert match_api_key(presented, keys) == expected
    assert len(counted_compare) == len(keys)


def test_requests_compare_against_every_configured_key(make_settings, counted_compare):
    settings = make_settings(api_keys={"alice": ALICE, "bob": BOB, "carol": CAROL}, chat_enabled=False,
                             classifier_enabled=False)
    with running_client(settings) as client:
        for headers, status in [({"Authorization": f"Bearer {ALICE}"}, 200), ({"X-API-Key": CAROL}, 200),
                                ({"Authorization": "Bearer " + "y" * 26}, 401)]:
            counted_compare.clear()
            assert client.get("/api/v1/conversations", headers=headers).status_code == status
            assert len(counted_compare) == 3, headers


class Captured(logging.Handler):
    """Every record of every logger that matters, rendered with its structured fields."""

    # Not uvicorn.access: it logs query strings, and app.logs.configure_logging (which every way of
    # serving calls) switches it off for our own access log, which has the path only.
    NAMES = ("", "scratchgpt", "scratchgpt.access", "scratchgpt.app", "uvicorn", "uvicorn.error", "fastapi")
    CLIENT_SIDE = ("httpx", "httpcore")  # the test's own HTTP client, not the server

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(self.CLIENT_SIDE):
            self.lines.append(self.format(record))

    def __enter__(self) -> "Captured":
        access = logging.getLogger("uvicorn.access")
        self._access_disabled, access.disabled = access.disabled, True  # as configure_logging does
        self._levels = {}
        for name in self.NAMES:
            log = logging.getLogger(name)
            self._levels[name] = log.level
            log.addHandler(self)
            log.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("uvicorn.access").disabled = self._access_disabled
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(self._levels[name])


def test_api_keys_never_reach_the_logs_or_responses(make_settings):
    settings = make_settings(api_keys={"alice": ALICE, "bob": BOB}, log_level="DEBUG")
    assert ALICE not in repr(settings) and ALICE not in settings.model_dump_json()
    near_miss = ALICE[:-1] + "X"
    with Captured() as logs, LiveServer(settings) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        good, wrong = {"Authorization": f"Bearer {ALICE}"}, {"X-API-Key": near_miss}
        responses = [
            client.get("/api/v1/conversations", headers=good),
            client.get("/api/v1/conversations", headers=wrong),
            client.post("/api/v1/classify", json={"text": "hi"}, headers=good),
            client.post("/api/v1/classify", json={"text": "hi"}, headers=wrong),
            client.get("/v1/models", headers={"Authorization": f"Bearer {BOB}"}),
            client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
                        headers={"Authorization": f"Bearer {near_miss}"}),
            client.get("/ready"),
            client.get("/metrics", headers=good),  # with keys, metrics are for keys (test_sign_in.py)
            client.get(f"/api/v1/conversations?api_key={near_miss}", headers=wrong),
        ]
        assert [r.status_code for r in responses] == [200, 401, 200, 401, 200, 401, 200, 200, 401]
    text = "\n".join(logs.lines)
    assert '"logger": "scratchgpt.access"' in text  # the capture saw the service's logs
    for secret in (ALICE, BOB, near_miss):
        assert secret not in text
        assert all(secret not in r.text and secret not in str(r.headers) for r in responses)


def test_serving_switches_off_uvicorns_access_log():
    from app.logs import configure_logging

    names = ("scratchgpt", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate,
                 logging.getLogger(n).disabled) for n in names}
    try:
        configure_logging("INFO", json_lines=True)
        assert logging.getLogger("uvicorn.access").disabled
    finally:
        for n, (handlers, level, propagate, disabled) in saved.items():
            log = logging.getLogger(n)
            log.handlers[:], log.level, log.propagate, log.disabled = handlers, level, propagate, disabled


# --- CSRF ---------------------------------------------------------------------------


def state_changing_routes(client) -> list[tuple[str, str]]:
    """Unsafe-method routes of our REST API (the OpenAI-compatible /v1 API uses keys, never cookies)."""
    paths = client.get("/openapi.json").json()["paths"]
    return [(method.upper(), path) for path, operations in paths.items() if path.startswith("/api/")
            for method in operations if method.upper() not in ("GET", "HEAD", "OPTIONS")]


def test_every_cookie_authenticated_change_needs_the_csrf_token(client):
    routes = state_changing_routes(client)
    assert len(routes) >= 14, routes
    cid = client.post("/api/v1/conversations", json={}).json()["id"]  # as the local owner: it is not the browser's
    csrf = browser_session(client)
    mine = client.post("/api/v1/conversations", json={"title": "browser"}, headers={"X-CSRF-Token": csrf}).json()["id"]
    other_csrf = browser_session(type(client)(client.app))  # a token of another browser session
    for method, path in routes:
        url = path.replace("{conversation_id}", mine).replace("{message_id}", "1")
        for headers in ({}, {"X-CSRF-Token": other_csrf}, {"X-CSRF-Token": ""}):
            response = client.request(method, url, json={}, headers=headers)
            assert response.status_code == 403, (method, path, headers, response.status_code)
            assert "CSRF" in response.json()["detail"]
    # Nothing happened: the browser's conversation is as it was, and still the only one it has.
    listed = client.get("/api/v1/conversations").json()
    assert [c["id"] for c in listed["conversations"]] == [mine] and listed["conversations"][0]["title"] == "browser"
    assert cid != mine


def test_a_cross_site_simple_post_is_refused(client):
    """Without a cookie (SameSite=Lax keeps it off cross-site POSTs) a page elsewhere can still send a
    "simple" request, which cannot carry Content-Type: application/json. The API reads only JSON."""
    before = client.get("/api/v1/conversations").json()["total"]
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        response = client.post("/api/v1/conversations", content=b'{"title": "from evil.example"}',
                               headers={"Content-Type": content_type, "Origin": "https://evil.example"})
        assert 400 <= response.status_code < 500, (content_type, response.status_code)
    assert client.get("/api/v1/conversations").json()["total"] == before


# --- headers -------------------------------------------------------------------------


def assert_protected(response, where: str) -> None:
    headers = response.headers
    assert headers.get("x-content-type-options") == "nosniff", where
    assert headers.get("x-frame-options") == "DENY", where
    csp = headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp, where
    script_src = re.search(r"script-src ([^;]*)", csp)
    assert script_src and "'unsafe-inline'" not in script_src.group(1) and "'unsafe-eval'" not in csp, where


def test_every_kind_of_response_carries_the_headers(make_settings):
    with running_client(make_settings(max_request_bytes=4096)) as client:
        cid = client.post("/api/v1/conversations", json={"max_new_tokens": 4}).json()["id"]
        with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "hi"}) as stream:
            assert [e for e, _ in parse_sse(stream.iter_lines())][-1] == "done"
        responses = {
            "sse": stream,
            "page": client.get("/"),
            "lab page": client.get("/lab/attention"),
            "docs": client.get("/docs"),
            "openapi": client.get("/openapi.json"),
            "static": client.get("/static/css/app.css"),
            "json": client.get("/api/v1/conversations"),
            "metrics": client.get("/metrics"),
            "openai": client.get("/v1/models"),
            "openai error": client.post("/v1/chat/completions", json={"model": "x", "messages": []}),
            "404": client.get("/api/v1/conversations/nope"),
            "405": client.put("/api/v1/conversations"),
            "413": client.post("/api/v1/classify", json={"text": "x" * 5000}),
            "422": client.post("/api/v1/classify", json={"text": 1}),
            "malformed json": client.post("/api/v1/classify", content=b"{not json", headers={"content-type": "application/json"}),
        }
        statuses = {name: r.status_code for name, r in responses.items()}
        assert statuses["413"] == 413 and statuses["405"] == 405 and statuses["malformed json"] in (400, 422), statuses
        for name, response in responses.items():
            assert_protected(response, name)


def test_no_page_has_inline_script_handler_or_style(client):
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 200, path
        assert_protected(response, path)
        html = response.text
        scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S | re.I)
        for attrs, body in scripts:
            assert re.search(r'\bsrc="/static/', attrs) and not body.strip(), (path, attrs)
        assert not re.search(r"<[^>]*\son[a-z]+\s*=", html, flags=re.I), path  # onclick=, onload=...
        assert not re.search(r"javascript:", html, flags=re.I), path
        assert not re.search(r"<style\b|\sstyle\s*=", html, flags=re.I), path
