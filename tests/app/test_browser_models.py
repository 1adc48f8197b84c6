"""The chat page's model picker in headless Chromium (issue 20): a new chat picks one of the served
chat models, the conversation keeps it (header, reload, its answers), the settings dialog starts
from the picked model's decoding defaults and stores penalties.

Skipped where /usr/bin/chromium or Playwright is missing (`apt-get install chromium`).
"""

from __future__ import annotations

import re

import pytest
from browser_testing import BROWSER_MARKS, browser_server, checked_page, open_ready
from chat_models_testing import SECOND, expected_answer, second_chat

pytestmark = BROWSER_MARKS

TOKENS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory, chat_checkpoint, classifier_checkpoint, gpt2_tok):
    second = second_chat(tmp_path_factory.mktemp("ckpt") / SECOND, gpt2_tok)
    with browser_server(tmp_path_factory.mktemp("models-home"), chat_checkpoint, classifier_checkpoint,
                        chat_models=[str(chat_checkpoint), str(second)], default_max_new_tokens=TOKENS) as live:
        live.second = second
        yield live


@pytest.fixture
def page(browser, server):
    with checked_page(browser, server, timeout_ms=20_000) as page:
        yield page


def stored(server, conversation_id: str):
    """The conversation (whoever the browser's session owner is) and its messages' text."""
    from app.db import crud
    from app.db.models import Conversation

    with server.app.state.sessions() as session:
        conversation = session.get(Conversation, conversation_id)
        return conversation, [m.content for m in crud.list_messages(session, conversation_id)]


def test_the_picked_model_is_the_conversations_and_answers_it(page, server):
    from playwright.sync_api import expect

    open_ready(page, "/")
    picker = page.locator("#model-picker")
    expect(page.locator("#model-choice")).to_be_visible()
    expect(picker.locator("option")).to_have_text(["tiny-chat", SECOND])
    expect(picker).to_have_value("tiny-chat")  # the default: the first that is ready
    expect(page.locator("#model-status")).to_have_text("tiny-chat")

    picker.select_option(SECOND)
    expect(page.locator("#model-status")).to_have_text(SECOND)
    expect(page.locator("#model-note")).to_contain_text("repetition penalty 1.3")
    # A new chat's settings start from the picked model's defaults.
    page.click("#settings-button")
    expect(page.locator("#set-repetition")).to_have_value("1.3")
    expect(page.locator("#set-temperature")).to_have_value("0")
    page.click("#settings-cancel")

    page.fill("#msg", "Name a colour.")
    page.press("#msg", "Enter")
    answer = page.locator(".message.assistant").last
    expect(answer).to_have_attribute("data-status", "complete")
    expect(page).to_have_url(re.compile(r"/c/[0-9a-f]{32}$"))
    expect(page.locator("#model-choice")).to_be_hidden()  # a conversation's model is chosen once
    expect(page.locator("#model-status")).to_have_text(SECOND)

    cid = page.url.rsplit("/", 1)[1]
    conversation, contents = stored(server, cid)
    assert conversation.model == SECOND and conversation.repetition_penalty == 1.3
    # The answer is the second model's (greedy under its defaults), not the default model's.
    turns = [{"role": "user", "content": "Name a colour."}]
    sampling = dict(temperature=0.0, top_k=None, top_p=conversation.top_p, repetition_penalty=1.3)
    assert contents[1] == expected_answer(server.second, conversation.system_prompt, turns, TOKENS, **sampling)
    assert contents[1] != expected_answer(server.app.state.models.chat["tiny-chat"].path,
                                          conversation.system_prompt, turns, TOKENS, **sampling)

    # Penalties are settings of the conversation.
    page.click("#settings-button")
    page.fill("#set-presence", "0.5")
    page.click("#settings-save")
    expect(page.locator("#settings-dialog")).not_to_be_visible()
    assert stored(server, cid)[0].presence_penalty == 0.5

    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    expect(page.locator("#model-status")).to_have_text(SECOND)

    # A new chat offers the picker again; its model is the one picked until another is.
    page.click("#new-chat")
    expect(page.locator("#model-choice")).to_be_visible()
    picker.select_option("tiny-chat")
    expect(page.locator("#model-status")).to_have_text("tiny-chat")
    page.fill("#msg", "Hello")
    page.press("#msg", "Enter")
    expect(page.locator(".message.assistant").last).to_have_attribute("data-status", "complete")
    expect(page).not_to_have_url(re.compile(cid))
    assert stored(server, page.url.rsplit("/", 1)[1])[0].model == "tiny-chat"
