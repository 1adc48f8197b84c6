"""Fixtures for the service tests: tiny *real* checkpoints and apps on temporary SQLite files.

The checkpoints are randomly initialised GPT models small enough to load and generate in
milliseconds, saved with core's save_checkpoint exactly as the training jobs save theirs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from app_testing import running_client
from postgres import SKIP_REASON, PostgresCluster, postgres_missing
from fastapi.testclient import TestClient

from app.settings import Settings

TINY = dict(vocab_size=50257, emb_dim=32, n_layers=2, n_heads=2)
# A long enough context that a stream can run for a while (stop and disconnect tests).
CHAT_CONTEXT = 1024


def _tiny_model(context_length: int, seed: int):
    from core.model.config import ModelConfig
    from core.model import GPTModel

    torch.manual_seed(seed)
    return GPTModel(ModelConfig(context_length=context_length, **TINY))


@pytest.fixture(scope="session")
def gpt2_tok():
    from core.tokenizer.gpt2 import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory, gpt2_tok) -> Path:
    from core.generation.chat_template import ALPACA
    from core.weights.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny-chat"
    return save_checkpoint(path, _tiny_model(CHAT_CONTEXT, 0), gpt2_tok, chat_template=ALPACA,
                           metadata={"name": "tiny-chat"})


@pytest.fixture(scope="session")
def short_chat_checkpoint(tmp_path_factory, gpt2_tok) -> Path:
    """A chat model with a 96-token window, to exercise dropping old turns."""
    from core.generation.chat_template import ALPACA
    from core.weights.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny-chat-short"
    return save_checkpoint(path, _tiny_model(96, 1), gpt2_tok, chat_template=ALPACA,
                           metadata={"name": "tiny-chat-short"})


@pytest.fixture(scope="session")
def classifier_checkpoint(tmp_path_factory, gpt2_tok) -> Path:
    from core.weights.checkpoint import save_checkpoint
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


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL server for the run (tests/postgres.py); skips where none can start."""
    if postgres_missing():
        pytest.skip(SKIP_REASON)
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """An empty database of each kind the service runs on: a SQLite file, and a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    return request.getfixturevalue("postgres_cluster").database()


@pytest.fixture
def client(make_settings) -> Iterator[TestClient]:
    """An app with both tiny models, ready; requests are made as the anonymous local owner."""
    with running_client(make_settings()) as c:
        yield c




@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for a browser test file (test_browser*.py mark themselves and skip without it).

    Per module, not per session, so the browser and its event loop are gone
    before the tests that follow in the same run.
    """
    from browser_testing import CHROMIUM, CHROMIUM_ARGS

    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()
