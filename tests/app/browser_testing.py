"""Helpers for the headless-Chromium tests (test_browser*.py); the ``browser`` fixture is in conftest.py.

Each file starts its own server (its own SQLite file, its own generation
settings) with ``browser_server`` and opens pages with ``watched_page``, which
records what the page reported; each file decides which of those reports fail
its tests.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from app_testing import LiveServer

from app.settings import Settings

# Debian's chromium by default; SCRATCHGPT_CHROMIUM names another build.
CHROMIUM = Path(os.environ.get("SCRATCHGPT_CHROMIUM") or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium is not installed at {CHROMIUM} (apt-get install chromium, or set SCRATCHGPT_CHROMIUM)"),
]
CSP = "Content Security Policy"


@contextlib.contextmanager
def browser_server(home: Path, chat_checkpoint: Path, classifier_checkpoint: Path, **overrides: Any) -> Iterator[LiveServer]:
    """The app under uvicorn with greedy decoding and quick stream flushes; keyword arguments override settings."""
    values: dict[str, Any] = dict(
        home=home, chat_checkpoint=chat_checkpoint, classifier_checkpoint=classifier_checkpoint,
        database_url=f"sqlite:///{home / 'app.db'}", device="cpu", log_json=False,
        default_temperature=0.0, stream_flush_seconds=0.1,
    )
    values.update(overrides)
    with LiveServer(Settings(**values)) as live:
        yield live


@dataclass
class PageReports:
    """What a page said while a test drove it."""

    console: list[tuple[str, str]] = field(default_factory=list)  # (type, text)
    errors: list[str] = field(default_factory=list)  # uncaught exceptions
    dialogs: list[str] = field(default_factory=list)  # alert/confirm/prompt, dismissed

    def csp_violations(self) -> list[str]:
        return [text for _, text in self.console if CSP in text]

    def console_errors(self) -> list[str]:
        return [text for kind, text in self.console if kind == "error"]


@contextlib.contextmanager
def watched_page(browser, server: LiveServer, *, height: int) -> Iterator[Any]:
    """A page in a fresh browser context (its own cookies) on ``server``; ``page.reports`` fills as it runs.

    Dialogs are recorded and dismissed, which is also what Playwright does with
    them when nobody listens, so recording them changes nothing on the page.
    """
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": height})
    page = context.new_page()
    reports = PageReports()
    page.reports = reports
    page.on("console", lambda msg: reports.console.append((msg.type, msg.text)))
    page.on("pageerror", lambda exc: reports.errors.append(str(exc)))

    def on_dialog(dialog) -> None:
        reports.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    try:
        yield page
    finally:
        context.close()


@contextlib.contextmanager
def checked_page(browser, server: LiveServer, *, timeout_ms: int = 20_000, height: int = 860) -> Iterator[Any]:
    """:func:`watched_page`, and afterwards the test fails on a page error, a CSP violation or another
    console error (the browser's note on a 4xx the page asked for on purpose aside)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=timeout_ms)
    with watched_page(browser, server, height=height) as page:
        yield page
    problems = [text for text in page.reports.console_errors() if "responded with a status of 4" not in text]
    problems += page.reports.csp_violations() + page.reports.errors
    assert not problems, f"page errors, CSP violations or console errors: {problems}"


def open_ready(page, path: str) -> None:
    """Go to ``path`` and wait until its script has set ``body[data-ready]``."""
    page.goto(path)
    page.wait_for_selector("body[data-ready='true']", timeout=30_000)
