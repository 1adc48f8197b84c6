"""Helpers for the service tests (imported by the test modules; fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from waiting import HANG_GUARD, wait_until

from app.main import create_app
from app.settings import Settings


def classify_concurrently(worker: Any, texts: list[str]) -> list[Any]:
    """Each text from its own concurrent caller of a started ClassifierWorker, which is stopped after."""

    async def main() -> list[Any]:
        return await asyncio.gather(*(worker.classify([t]) for t in texts))

    try:
        return asyncio.run(main())
    finally:
        worker.stop()


@contextlib.contextmanager
def running_client(settings: Settings, wait: bool = True) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app) as client:
        if wait:
            assert app.state.models.wait_loaded(HANG_GUARD), "models did not finish loading"
        yield client


def browser_session(client: TestClient, follow_sign_in: bool = False) -> str:
    """Open the chat page like a browser: the client keeps the session cookie; returns the CSRF token.
    ``follow_sign_in``: a server with API keys sends the browser to its sign-in page; take that one."""
    page = client.get("/", follow_redirects=follow_sign_in)
    assert page.status_code == 200
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text)
    assert match, "chat page has no CSRF token"
    return match.group(1)


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """(event, data) pairs from an SSE line iterator (httpx's iter_lines)."""
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
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "uvicorn's start")
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")
        assert self.app.state.models.wait_loaded(HANG_GUARD)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@contextlib.contextmanager
def chat_server(home: Path, chat_checkpoint: Path, **overrides: Any) -> Iterator[LiveServer]:
    """The app under uvicorn serving only a chat model, on its own SQLite file in ``home``;
    keyword arguments override settings."""
    values: dict[str, Any] = dict(home=home, chat_checkpoint=chat_checkpoint, classifier_enabled=False, device="cpu",
                                  database_url=f"sqlite:///{home / 'app.db'}", log_json=False)
    values.update(overrides)
    with LiveServer(Settings(**values)) as live:
        yield live


class TokenGate:
    """Holds a ChatWorker in its decoding loop once it has generated ``hold_at`` tokens, until
    :meth:`release`: after counting a chunk's tokens, before relaying the chunk or looking for a
    cancel. A test can then stop, cancel or disconnect while generation is known to be paused at
    a known token count, instead of racing the worker, and see that no token follows the chunk
    it was holding."""

    def __init__(self, worker: Any, hold_at: int) -> None:
        self.worker, self.hold_at = worker, hold_at
        self.tokens = 0  # generated while the gate was in place
        self.held = threading.Event()
        self._go = threading.Event()
        self._inner = worker._on_tokens

    def _on_tokens(self, n: int) -> None:
        self._inner(n)
        self.tokens += n
        if self.tokens >= self.hold_at and not self._go.is_set():
            self.held.set()
            self._go.wait(HANG_GUARD)

    def __enter__(self) -> "TokenGate":
        self.worker._on_tokens = self._on_tokens
        return self

    def __exit__(self, *exc: object) -> None:
        self._go.set()
        self.worker._on_tokens = self._inner

    def wait_held(self) -> int:
        """Wait until the worker is held; the tokens it had generated by then."""
        assert self.held.wait(HANG_GUARD), f"the worker never reached {self.hold_at} tokens"
        return self.tokens

    def release(self) -> None:
        self._go.set()
