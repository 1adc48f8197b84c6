"""End to end in headless Chromium (Playwright + Debian's chromium): the chat UI and the spam page.

Skipped where Chromium (/usr/bin/chromium or $SCRATCHGPT_CHROMIUM) or Playwright is missing (`apt-get install chromium`).
"""

from __future__ import annotations

import re

import pytest
from browser_testing import BROWSER_MARKS, browser_server, open_ready, watched_page

pytestmark = BROWSER_MARKS

XSS_PAYLOADS = [
    "<script>window.__xss = 'script'</script>",
    '<img src=x onerror="window.__xss = \'img\'">',
    "[click me](javascript:window.__xss='link')",
    '<a href="javascript:window.__xss=\'a\'">raw link</a>',
    "<svg onload=\"window.__xss='svg'\"></svg> **bold** `<b>code</b>`",
    "```html\n<script>window.__xss = 'fenced'</script>\n```",
    '<iframe src="javascript:parent.__xss=\'iframe\'"></iframe>',
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, chat_checkpoint, classifier_checkpoint):
    with browser_server(tmp_path_factory.mktemp("browser-home"), chat_checkpoint, classifier_checkpoint,
                        default_max_new_tokens=40) as live:
        yield live


@pytest.fixture
def page(browser, server):
    with watched_page(browser, server, height=800) as page:
        yield page
    errors = page.reports.errors
    assert not errors, f"JavaScript errors on the page: {errors}"


def last_answer(page):
    return page.locator(".message.assistant").last


def test_chat_stream_reload_history_and_stop(page, server):
    from playwright.sync_api import expect

    open_ready(page, "/")
    expect(page.locator("#model-status")).to_have_text("tiny-chat")

    page.fill("#msg", "Hello there, model")
    page.press("#msg", "Enter")
    answer = last_answer(page)
    # Text arrives while the answer is still streaming, then the answer completes.
    expect(answer).to_have_attribute("data-status", "complete", timeout=20_000)
    text = answer.locator(".content").inner_text()
    assert text.strip()
    expect(answer.locator(".meta-text")).to_contain_text("tok/s")
    expect(page).to_have_url(re.compile(r"/c/[0-9a-f]{32}$"))
    expect(page.locator("#chat-title")).to_have_text("Hello there, model")
    expect(page.locator(".conversation-item.active .conversation-link")).to_have_text("Hello there, model")

    # Reload: the conversation comes back from the database.
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    expect(page.locator(".message.user .content")).to_have_text("Hello there, model")
    expect(last_answer(page).locator(".content")).to_have_text(text)

    # Settings: a long answer, so there is time to stop it.
    page.click("#settings-button")
    page.fill("#set-max-tokens", "900")
    page.click("#settings-save")
    expect(page.locator("#settings-dialog")).not_to_be_visible()

    page.fill("#msg", "Now talk for a long time")
    page.click("#send")
    answer = last_answer(page)
    expect(page.locator("#stop")).to_be_visible()
    expect(answer).to_have_attribute("data-status", "streaming")
    expect(answer.locator(".content")).not_to_have_text("", timeout=10_000)  # streamed text is visible
    expect(answer.locator(".content")).to_have_text(re.compile(r"\S.{20,}", re.S), timeout=10_000)
    page.click("#stop")
    expect(answer).to_have_attribute("data-status", "interrupted", timeout=10_000)
    expect(answer.locator(".meta-text")).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator(".regenerate")).to_be_visible()

    # Stopped, not lost: the partial answer is in the database.
    cid = page.url.rsplit("/", 1)[1]
    with server.app.state.sessions() as session:
        from app.db import crud

        stored = crud.list_messages(session, cid)[-1]
    assert stored.status == "interrupted" and 0 < (stored.completion_tokens or 0) < 900
    assert stored.content.strip()[:10] in answer.locator(".content").inner_text()

    # Shift+Enter makes a new line instead of sending.
    page.fill("#msg", "line one")
    page.press("#msg", "Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#msg") == "line one\nline two"
    assert page.locator(".message.user").count() == 2
    assert not page.reports.csp_violations()


def test_sidebar_new_rename_delete(page):
    from playwright.sync_api import expect

    open_ready(page, "/")
    page.fill("#msg", "first chat")
    page.press("#msg", "Enter")
    expect(last_answer(page)).to_have_attribute("data-status", "complete", timeout=20_000)
    page.click("#new-chat")
    expect(page).to_have_url(re.compile(r"/$"))
    expect(page.locator("#empty-state")).to_be_visible()
    page.fill("#msg", "second chat")
    page.press("#msg", "Enter")
    expect(last_answer(page)).to_have_attribute("data-status", "complete", timeout=20_000)
    items = page.locator(".conversation-item")
    expect(items).to_have_count(2)

    item = page.locator(".conversation-item", has_text="first chat")
    item.hover()
    item.locator(".rename").click()
    page.fill(".rename-input", "Renamed chat")
    page.press(".rename-input", "Enter")
    expect(page.locator(".conversation-link", has_text="Renamed chat")).to_be_visible()

    renamed = page.locator(".conversation-item", has_text="Renamed chat")
    renamed.hover()
    renamed.locator(".delete").click()
    page.click("#confirm-ok")
    expect(items).to_have_count(1)
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    expect(page.locator(".conversation-link")).to_have_text(["second chat"])


def test_xss_in_messages_and_answers_stays_inert(page, server):
    from playwright.sync_api import expect

    open_ready(page, "/")
    # A user message with every payload, sent through the UI.
    payload = "\n\n".join(XSS_PAYLOADS)
    page.fill("#msg", payload)
    page.press("#msg", "Enter")
    expect(last_answer(page)).to_have_attribute("data-status", "complete", timeout=20_000)
    cid = page.url.rsplit("/", 1)[1]

    # Answers with the payloads, as if the model had written them (rendered as Markdown).
    with server.app.state.sessions() as session:
        from app.db import crud

        for p in XSS_PAYLOADS:
            crud.add_message(session, cid, "assistant", f"Here you go:\n\n{p}\n\n- item with {p}")
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    expect(page.locator(".message.assistant")).to_have_count(1 + len(XSS_PAYLOADS))
    page.wait_for_timeout(300)  # give any injected handler a chance to fire

    assert page.evaluate("window.__xss") is None
    assert page.evaluate("parent.__xss") is None
    messages = page.locator("#messages")
    assert messages.locator("script, iframe, svg, img, object, embed").count() == 0
    assert page.evaluate(
        "[...document.querySelectorAll('#messages *')].filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length"
    ) == 0
    assert page.evaluate(
        "[...document.querySelectorAll('#messages a')].filter(a => !/^(https?:|mailto:)/.test(a.getAttribute('href'))).length"
    ) == 0
    # The payloads are shown as text.
    expect(page.locator(".message.user .content")).to_contain_text("<script>window.__xss = 'script'</script>")
    expect(page.locator(".message.assistant .content").nth(1)).to_contain_text("<script>")
    expect(page.locator(".message.assistant strong").first).to_have_text("bold")
    assert not page.reports.csp_violations()  # nothing even tried to run


def test_markdown_renderer_output(page):
    """markdown-it's output after DOMPurify (newlines between blocks left out here)."""
    open_ready(page, "/")
    html = page.evaluate(
        """async () => {
            const { renderMarkdown } = await import('/static/js/markdown.js');
            return renderMarkdown([
              '# Title', 'Some **bold**, *italic* and `code`.', '',
              '- one', '- two', '', '1. first', '2. second', '',
              '```python', 'print("<hi>")', '```', '',
              '> quoted', '', '[site](https://example.com/?a=1&b=2) and [bad](javascript:alert(1))',
            ].join('\\n'));
        }"""
    ).replace("\n", "")
    assert "<h1>Title</h1>" in html
    assert "<strong>bold</strong>" in html and "<em>italic</em>" in html and "<code>code</code>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<ol><li>first</li><li>second</li></ol>" in html
    assert '<pre><code class="hljs language-python"><span class="hljs-built_in">print</span>(' in html
    assert '<span class="hljs-string">"&lt;hi&gt;"</span>)</code></pre>' in html  # highlighted, still text
    assert "<blockquote><p>quoted</p></blockquote>" in html
    assert 'href="https://example.com/?a=1&amp;b=2"' in html and 'rel="noopener noreferrer nofollow"' in html
    assert "javascript:" in html and 'href="javascript' not in html  # shown as text, not linked


def test_markdown_code_inside_a_link_label(page, server):
    """A code span in a link's label renders as <code> inside <a>, never as a placeholder or in href."""
    from playwright.sync_api import expect

    open_ready(page, "/")
    link = 'target="_blank" rel="noopener noreferrer nofollow"'
    html = page.evaluate(
        """async (sources) => {
            const { renderMarkdown } = await import('/static/js/markdown.js');
            return sources.map((s) => renderMarkdown(s));
        }""",
        ["[`x`](https://a.b)", "[**`code`** here](https://a.b/?q=1&r=2) and `y`", "[a](https://x/`y`)",
         "[`<img src=x onerror=alert(1)>`](https://a.b)"],
    )
    html = [h.strip() for h in html]
    assert html[0] == f'<p><a href="https://a.b" {link}><code>x</code></a></p>'
    assert html[1] == f'<p><a href="https://a.b/?q=1&amp;r=2" {link}><strong><code>code</code></strong> here</a> and <code>y</code></p>'
    assert html[2] == f'<p><a href="https://x/%60y%60" {link}>a</a></p>'  # backticks in a URL: part of it, encoded
    assert html[3] == f'<p><a href="https://a.b" {link}><code>&lt;img src=x onerror=alert(1)&gt;</code></a></p>'
    assert not any("\u0000" in h for h in html)

    # The same in a stored answer, as the chat page shows it.
    cid = page.evaluate(
        """async () => {
            const csrf = document.querySelector('meta[name="csrf-token"]').content;
            const r = await fetch("/api/v1/conversations", {method: "POST", body: JSON.stringify({title: "links"}),
                headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf}});
            return (await r.json()).id;
        }"""
    )
    with server.app.state.sessions() as session:
        from app.db import crud

        crud.add_message(session, cid, "user", "a link please")
        crud.add_message(session, cid, "assistant", "See [`pip install`](https://pip.pypa.io/) for more.")
    open_ready(page, f"/c/{cid}")
    anchor = page.locator(".message.assistant .content a")
    expect(anchor).to_have_attribute("href", "https://pip.pypa.io/")
    expect(anchor.locator("code")).to_have_text("pip install")
    expect(page.locator(".message.assistant .content")).to_have_text("See pip install for more.")


def test_chat_shows_model_unavailable(browser, tmp_path, classifier_checkpoint):
    from playwright.sync_api import expect

    with browser_server(tmp_path, tmp_path / "missing", classifier_checkpoint) as live, \
            watched_page(browser, live, height=720) as page:
        open_ready(page, "/")
        expect(page.locator("#model-status")).to_have_text("model unavailable")
        expect(page.locator("#banner-text")).to_contain_text("scratchgpt download smollm2-135m-instruct")
        page.fill("#msg", "hello?")
        page.press("#msg", "Enter")
        expect(page.locator("#banner-text")).to_contain_text("not available")
        expect(page.locator("#msg")).to_have_value("hello?")  # the text is given back, nothing lost


def test_connection_lost_is_reported_and_the_message_given_back(page):
    from playwright.sync_api import expect

    open_ready(page, "/")
    page.route("**/messages", lambda route: route.abort("connectionrefused"))
    page.fill("#msg", "are you there?")
    page.press("#msg", "Enter")
    expect(page.locator("#banner-text")).to_contain_text("Connection lost")
    expect(page.locator("#msg")).to_have_value("are you there?")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#send")).to_be_visible()


def test_spam_page(page):
    from playwright.sync_api import expect

    page.goto("/spam")
    page.wait_for_selector("body[data-ready='true']")
    page.fill("#spam-text", "WINNER!! Claim your free prize now, call 0906170")
    page.click("#spam-check")
    result = page.locator("#spam-result")
    expect(result).to_be_visible()
    label = result.get_attribute("data-label")
    assert label in ("spam", "ham")
    expect(page.locator("#spam-prob")).to_contain_text("% probability of spam")
    expect(page.locator("#spam-model")).to_have_text("tiny-spam")
    expect(page.locator("#spam-history li")).to_have_count(1)
    page.fill("#spam-text", "")
    page.click("#spam-check")
    expect(page.locator("#spam-banner")).to_contain_text("Type or paste")
