"""Errors are answers (issue 21): JSON with a message and the security headers, even for a bug;
the 500s and unreadable messages a browser and a fuzzer found; capped log lines; and a clear
refusal to start on a database the service cannot write.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from app.logs import JsonFormatter, TextFormatter
from app.main import create_app
from app.server import EXIT_DATABASE_READ_ONLY

from app_testing import free_port, running_client

LAB = "/api/v1/lab"


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


@pytest.fixture(scope="module")
def byteless_checkpoint(tmp_path_factory):
    """A chat model whose vocabulary lacks the byte 0x13, as SmolLM2's lacks most control characters."""
    import torch

    from core.generation.chat_template import ALPACA
    from core.model import GPTModel, ModelConfig
    from core.tokenizer.bpe import BPETokenizer
    from core.weights.checkpoint import save_checkpoint

    ranks = {bytes([b]): b for b in range(256) if b != 0x13}
    tokenizer = BPETokenizer(ranks, name="no-0x13", unknown_bytes="drop")
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(vocab_size=256, context_length=64, emb_dim=32, n_layers=1, n_heads=2))
    path = tmp_path_factory.mktemp("ckpt") / "byteless"
    return save_checkpoint(path, model, tokenizer, chat_template=ALPACA, metadata={"name": "byteless"})


def test_an_embedding_word_without_tokens_is_a_422_that_says_so(make_settings, byteless_checkpoint):
    with running_client(make_settings(chat_checkpoint=byteless_checkpoint, classifier_enabled=False)) as client:
        response = client.post(f"{LAB}/embeddings", json={"words": ["\u0013", "king"], "leading_space": False})
        assert response.status_code == 422, response.text
        assert "words[0]" in response.json()["detail"] and "no tokens" in response.json()["detail"]
        assert client.post(f"{LAB}/embeddings", json={"words": ["queen", "king"]}).status_code == 200


# --- messages a client can read -------------------------------------------------------------


def test_too_many_stop_strings_names_the_limit(client):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert "at most 4 stop sequences" in error["message"] and "got 5" in error["message"], error
    assert error["param"] == "stop"
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ChatCompletionRequest"]
    assert {"type": "array", "items": {"type": "string"}, "maxItems": 4} in schema["properties"]["stop"]["anyOf"]
    body["stop"] = list("abcd")
    body["max_tokens"] = 2
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_the_lab_accepts_exactly_what_its_schema_calls_text(client):
    """The documented pattern and the server agree on what is blank: "\\u001e" is text to both
    (Python's str.strip() took it for space), a no-break and an ideographic space are blank to both."""
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    pattern = schema["TokenizeRequest"]["properties"]["text"]["pattern"]
    for text, is_text in [("\u001e", True), ("\u0085", True), ("\u001c\u001f", True), ("x", True),
                          ("\u00a0\u3000", False), (" \t\n", False), ("\ufeff", False)]:
        assert bool(re.search(pattern, text)) == is_text, repr(text)
        response = client.post(f"{LAB}/tokenize", json={"text": text})
        assert response.status_code == (200 if is_text else 422), (repr(text), response.text)
        if is_text:
            assert all(t["count"] >= 1 for t in response.json()["tokenizers"])
    words = client.post(f"{LAB}/embeddings", json={"words": ["\u001e", "king"]})
    assert words.status_code == 200 and words.json()["points"][0]["word"] == "\u001e"


# --- logs ---------------------------------------------------------------------------------


def test_a_long_url_writes_a_short_access_log_line(client):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    access = logging.getLogger("scratchgpt.access")
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        assert client.get("/" + "a" * 60_000)  # near httpx's own limit (64 KiB).status_code == 404
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    (record,) = [r for r in records if r.msg == "request"]
    line = JsonFormatter().format(record)
    assert len(line) < 3000 and "more characters" in line
    assert len(record.path) == 60_001  # capped in the line, not in what the app sees

    long_message = logging.LogRecord("scratchgpt.app", logging.INFO, "", 0, "x" * 100_000, None, None)
    assert len(TextFormatter().format(long_message)) < 3000


# --- startup ------------------------------------------------------------------------------


def test_a_read_only_database_stops_the_start_with_one_line(tmp_path):
    """As in production: the real CLI in its own process, on a database file it may only read."""
    from app.db import upgrade
    from app.settings import Settings

    db = tmp_path / "app.db"
    url = f"sqlite:///{db}"
    upgrade(url, migrations_dir=Settings().migrations_dir)
    db.chmod(0o444)
    command = [sys.executable, "-m", "scratchgpt", "serve", "--no-setup", "--port", str(free_port())]
    if os.geteuid() == 0:
        # Root writes any file; without these capabilities, root too is held to the file's mode.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv (util-linux) to drop the override capabilities")
        command = [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner", *command]
    env = {**os.environ, "SCRATCHGPT_HOME": str(tmp_path / "home"), "SCRATCHGPT_DATABASE_URL": url,
           "SCRATCHGPT_CHAT_ENABLED": "false", "SCRATCHGPT_CLASSIFIER_ENABLED": "false"}
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_DATABASE_READ_ONLY, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    said = [line for line in done.stderr.splitlines() if "read-only" in line]
    assert len(said) == 1 and str(db) in said[0] and "SCRATCHGPT_DATABASE_URL" in said[0], done.stderr
