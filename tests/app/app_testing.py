"""Helpers for the service tests (imported by the test modules; fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from fastapi.testclient import TestClient

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
            assert app.state.models.wait_loaded(60), "models did not finish loading"
        yield client


def browser_session(client: TestClient) -> str:
    """Open the chat page like a browser: the client keeps the session cookie; returns the CSRF token."""
    page = client.get("/")
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
