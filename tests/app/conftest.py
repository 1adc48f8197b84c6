"""Fixtures for the service tests: tiny *real* checkpoints and apps on temporary SQLite files.

The checkpoints are randomly initialised GPT models small enough to load and generate in
milliseconds, saved with core's save_checkpoint exactly as the training jobs save theirs.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

TINY = dict(vocab_size=50257, emb_dim=32, n_layers=2, n_heads=2)
# A long enough context that a stream can run for a while (stop and disconnect tests).
CHAT_CONTEXT = 1024


def _tiny_model(context_length: int, seed: int):
    from core.config import ModelConfig
    from core.model import GPTModel

    torch.manual_seed(seed)
    return GPTModel(ModelConfig(context_length=context_length, **TINY))


@pytest.fixture(scope="session")
def gpt2_tok():
    from core.tokenizer.gpt2 import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory, gpt2_tok) -> Path:
    from core.chat_template import ALPACA
    from core.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny-chat"
    return save_checkpoint(path, _tiny_model(CHAT_CONTEXT, 0), gpt2_tok, chat_template=ALPACA,
                           metadata={"name": "tiny-chat"})


@pytest.fixture(scope="session")
def short_chat_checkpoint(tmp_path_factory, gpt2_tok) -> Path:
    """A chat model with a 96-token window, to exercise dropping old turns."""
    from core.chat_template import ALPACA
    from core.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny-chat-short"
    return save_checkpoint(path, _tiny_model(96, 1), gpt2_tok, chat_template=ALPACA,
                           metadata={"name": "tiny-chat-short"})


@pytest.fixture(scope="session")
def classifier_checkpoint(tmp_path_factory, gpt2_tok) -> Path:
    from core.checkpoint import save_checkpoint
    from core.classifier import SequenceClassifier

    path = tmp_path_factory.mktemp("ckpt") / "tiny-spam"
    classifier = SequenceClassifier(_tiny_model(128, 2), num_classes=2)
    return save_checkpoint(path, classifier, gpt2_tok, task="classification", labels=["ham", "spam"],
                           metadata={"name": "tiny-spam"})


@pytest.fixture
def make_settings(tmp_path, chat_checkpoint, classifier_checkpoint):
    """Settings on a fresh home and SQLite file; keyword arguments override."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = dict(
            home=tmp_path / "home",
            chat_checkpoint=chat_checkpoint,
            classifier_checkpoint=classifier_checkpoint,
            database_url=f"sqlite:///{tmp_path / 'app.db'}",
            device="cpu",
            log_json=False,
            stream_flush_seconds=0.05,
        )
        values.update(overrides)
        return Settings(**values)

    return make


@contextlib.contextmanager
def running_client(settings: Settings, wait: bool = True) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app) as client:
        if wait:
            assert app.state.models.wait_loaded(60), "models did not finish loading"
        yield client


@pytest.fixture
def client(make_settings) -> Iterator[TestClient]:
    """An app with both tiny models, ready; requests are made as the anonymous local owner."""
    with running_client(make_settings()) as c:
        yield c


def browser_session(client: TestClient) -> str:
    """Open the chat page like a browser: the client keeps the session cookie; returns the CSRF token."""
    import re

    page = client.get("/")
    assert page.status_code == 200
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text)
    assert match, "chat page has no CSRF token"
    return match.group(1)


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """(event, data) pairs from an SSE line iterator (httpx's iter_lines)."""
    import json

    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        yield event, json.loads("\n".join(data))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The app under a real uvicorn on 127.0.0.1, in a daemon thread."""

    def __init__(self, settings: Settings) -> None:
        import uvicorn

        self.app = create_app(settings)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        assert self.app.state.models.wait_loaded(60)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
