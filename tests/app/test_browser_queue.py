"""In headless Chromium: while other answers hold the model's places, the chat says how many go
before this one ("waiting: 1 ahead"), then streams the answer once its turn comes."""

from __future__ import annotations

import threading

import httpx
import pytest
from app_testing import TokenGate
from browser_testing import BROWSER_MARKS, browser_server, open_ready, watched_page
from waiting import wait_until

pytestmark = BROWSER_MARKS


@pytest.fixture(scope="module")
def server(tmp_path_factory, chat_checkpoint, classifier_checkpoint):
    # One place: answers decode one at a time, so the others queue.
    with browser_server(tmp_path_factory.mktemp("queue-home"), chat_checkpoint, classifier_checkpoint,
                        default_max_new_tokens=8, chat_max_batch=1) as live:
        yield live


def api_answer(server, results: list) -> None:
    """An answer asked through the REST API by another client, read to its end."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        cid = client.post("/api/v1/conversations", json={"max_new_tokens": 6}).json()["id"]
        with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "hello"}) as r:
            results.append(r.status_code)
            for _ in r.iter_lines():
                pass


def test_a_queued_answer_shows_its_place_then_streams(browser, server):
    from playwright.sync_api import expect

    worker = server.app.state.models.slots["chat"].worker
    results: list = []
    with watched_page(browser, server, height=800) as page, TokenGate(worker, hold_at=2) as gate:
        open_ready(page, "/")
        first = threading.Thread(target=api_answer, args=(server, results))
        first.start()
        gate.wait_held()  # the first answer holds the one place, paused at its second token
        second = threading.Thread(target=api_answer, args=(server, results))
        second.start()
        # The second API answer is queued first; the page's answer comes after it.
        wait_until(lambda: worker.engine.stats.waiting == 1, "the second answer waiting in the engine")
        page.fill("#msg", "Tell me a story")
        page.keyboard.press("Enter")
        answer = page.locator(".message.assistant").last
        expect(answer.locator(".waiting")).to_have_text("waiting: 1 ahead")
        gate.release()
        expect(answer).to_have_attribute("data-status", "complete", timeout=60_000)
        expect(answer.locator(".waiting")).to_have_count(0)
        first.join(120)
        second.join(120)
        assert not page.reports.errors
    assert results == [200, 200]
