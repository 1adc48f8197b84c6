"""In headless Chromium, on a server with API keys: the chat sends the browser to the sign-in page,
a wrong key is refused with a message, the right one opens the chat, which then answers."""

from __future__ import annotations

import pytest
from browser_testing import BROWSER_MARKS, browser_server, watched_page

pytestmark = BROWSER_MARKS

ALICE = "alice-key-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory, chat_checkpoint, classifier_checkpoint):
    with browser_server(tmp_path_factory.mktemp("signin-home"), chat_checkpoint, classifier_checkpoint,
                        default_max_new_tokens=6, api_keys={"alice": ALICE}) as live:
        yield live


def test_sign_in_then_chat(browser, server):
    from playwright.sync_api import expect

    with watched_page(browser, server, height=800) as page:
        page.goto("/")
        expect(page).to_have_url(f"{server.url}/login?next=/")
        page.fill("#login-key", "not-the-key-000000000000")
        page.click("#login-submit")
        expect(page.locator("#login-error")).to_contain_text("not one of this server")
        page.fill("#login-key", ALICE)
        page.click("#login-submit")
        expect(page).to_have_url(f"{server.url}/")
        page.wait_for_selector("body[data-ready='true']", timeout=30_000)
        page.fill("#msg", "Hello")
        page.press("#msg", "Enter")
        expect(page.locator(".message.assistant").last).to_have_attribute("data-status", "complete", timeout=60_000)
        assert not page.reports.errors and not page.reports.csp_violations()
