"""Errors are answers (issue 21): JSON with a message and the security headers, even for a bug;
the 500s and unreadable messages a browser and a fuzzer found; capped log lines; and a clear
refusal to start on a database the service cannot write.
"""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.main import create_app


def assert_protected(response) -> None:
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-request-id"]


# --- 500s ---------------------------------------------------------------------------------


def test_an_unhandled_error_is_a_json_500_with_the_security_headers(make_settings):
    app = create_app(make_settings(chat_enabled=False, classifier_enabled=False))

    def broken() -> None:
        raise RuntimeError("a bug's internals")

    # Real routes on the real app: the stack around them is what is tested.
    app.add_api_route("/api/v1/broken", broken)
    app.add_api_route("/v1/broken", broken)
    with TestClient(app) as client:
        response = client.get("/api/v1/broken")
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/json"
        assert_protected(response)
        detail = response.json()["detail"]
        assert "internal server error" in detail and response.headers["x-request-id"] in detail
        assert "internals" not in response.text  # the log has them, the client does not

        openai = client.get("/v1/broken")
        assert openai.status_code == 500 and openai.json()["error"]["type"] == "server_error"
        assert_protected(openai)
        assert app.state.metrics.requests.labels("GET", "/api/v1/broken", "500")._value.get() == 1
