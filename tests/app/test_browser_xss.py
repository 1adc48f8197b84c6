"""XSS payloads where tests/app/test_browser.py does not put them, in headless Chromium.

test_browser.py sends script tags, event handlers, javascript: links and raw HTML as a message
and as answers. This file puts payloads in the other places user text reaches a page:
conversation titles (sidebar, header, document title), Markdown edge cases in answers
(attribute-breaking URLs, mixed-case and entity-encoded schemes, data: links, images,
autolinks), the spam page (result history and token explanation), and every Lab page
(token chips, attention strip, next-token bars, embedding labels, a stored answer's tokens).

Each check: nothing ran (no ``window.__xss``, no dialog, no CSP violation, no page error), and
nothing was injected (no on* attribute, no script but our own files, no frame or object, no
javascript:/data:/vbscript: URL anywhere in the document).
"""

from __future__ import annotations

import pytest
from app_testing import LiveServer
from browser_testing import BROWSER_MARKS, CSP, browser_server, open_ready, watched_page

pytestmark = BROWSER_MARKS

# Short enough for a title (200 characters) and an embedding word (40).
PAYLOADS = [
    "<script>window.__xss='script'</script>",
    "<img src=x onerror=window.__xss='img'>",
    "<svg/onload=window.__xss='svg'>",
    "\"><b onmouseover=window.__xss='attr'>b</b>",
    "'><a href=javascript:alert('a')>a</a>",
    "<iframe srcdoc='<script>parent.__xss=1</script>'>",
    "<details open ontoggle=alert('details')>",
    "{{7*7}} ${7*7} <%= 7*7 %>",
]
MARKDOWN_PAYLOADS = [
    "[case](JaVaScRiPt:window.__xss='case')",
    "[spaced](  javascript:window.__xss='space')",
    "[data](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[entity](&#106;avascript:window.__xss='entity')",
    "[quote](https://example.com/\"onmouseover=\"window.__xss='quote')",
    "[single](https://example.com/'onmouseover='window.__xss=1')",
    "<javascript:window.__xss='autolink'>",
    "![image](x\" onerror=\"window.__xss='image')",
    "**<img src=x onerror=window.__xss='bold'>** and `<img src=x onerror=alert(1)>`",
    "> <script>window.__xss='blockquote'</script>",
    "1. <svg onload=window.__xss='list'>",
    "# <img src=x onerror=window.__xss='heading'>",
    "```\"><script>window.__xss='lang'</script>\nbody\n```",
    "[<img src=x onerror=alert(1)>](https://example.com)",
]

INJECTION_REPORT = """() => {
  const bad = [];
  const urlAttrs = ['href', 'src', 'action', 'formaction', 'xlink:href', 'srcdoc', 'data'];
  for (const el of document.querySelectorAll('*')) {
    for (const a of el.attributes) {
      if (a.name.startsWith('on')) bad.push(`${el.tagName} ${a.name}`);
      if (urlAttrs.includes(a.name) && /^\\s*(javascript|data|vbscript):/i.test(a.value)) bad.push(`${el.tagName} ${a.name}=${a.value}`);
      if (a.name === 'srcdoc') bad.push(`${el.tagName} srcdoc`);
    }
  }
  for (const s of document.querySelectorAll('script')) {
    if (!(s.getAttribute('src') || '').startsWith('/static/')) bad.push('SCRIPT ' + s.outerHTML.slice(0, 80));
  }
  for (const el of document.querySelectorAll('iframe, frame, object, embed, base, meta[http-equiv]')) bad.push(el.tagName);
  if (window.__xss !== undefined || (window.parent && window.parent.__xss !== undefined)) bad.push('window.__xss=' + window.__xss);
  return bad;
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, chat_checkpoint, classifier_checkpoint):
    with browser_server(tmp_path_factory.mktemp("xss-home"), chat_checkpoint, classifier_checkpoint,
                        default_max_new_tokens=8) as live:
        yield live


@pytest.fixture
def page(browser, server):
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)  # a forward pass on a busy CPU can take seconds
    with watched_page(browser, server, height=900) as page:
        yield page


def problems(page) -> list[str]:
    """CSP violations, page errors and dialogs so far: each means something ran, or tried to."""
    reports = page.reports
    return [*reports.csp_violations(), *(f"page error: {e}" for e in reports.errors),
            *(f"dialog: {d}" for d in reports.dialogs)]


def assert_inert(page, where: str) -> None:
    page.wait_for_timeout(200)  # let any injected handler fire
    assert page.evaluate(INJECTION_REPORT) == [], where
    assert problems(page) == [], where


def api(page, method: str, path: str, body: dict | None = None):
    """A request from the page itself, with its session cookie and CSRF token, as the UI makes them."""
    return page.evaluate(
        """async ([method, path, body]) => {
            const csrf = document.querySelector('meta[name="csrf-token"]').content;
            const r = await fetch(path, {method, headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
                                         body: body === null ? undefined : JSON.stringify(body)});
            const text = await r.text();
            return {status: r.status, json: text.startsWith("{") ? JSON.parse(text) : text};
        }""",
        [method, path, body],
    )


def add_answer(server: LiveServer, cid: str, text: str) -> None:
    """An answer as if the model had written it."""
    from app.db import crud

    with server.app.state.sessions() as session:
        crud.add_message(session, cid, "user", "say something")
        crud.add_message(session, cid, "assistant", text)


def test_conversation_titles_stay_inert(page):
    from playwright.sync_api import expect

    open_ready(page, "/")
    ids = []
    for payload in PAYLOADS:
        created = api(page, "POST", "/api/v1/conversations", {"title": payload})
        assert created["status"] == 201 and created["json"]["title"] == payload
        ids.append(created["json"]["id"])
    open_ready(page, "/")
    links = page.locator(".conversation-link")
    expect(links).to_have_count(len(PAYLOADS))
    assert sorted(links.all_text_contents()) == sorted(PAYLOADS)  # shown as the text typed
    for i in range(links.count()):
        links.nth(i).hover()
    assert_inert(page, "sidebar")
    for cid, payload in zip(ids, PAYLOADS):
        open_ready(page, f"/c/{cid}")
        expect(page.locator("#chat-title")).to_have_text(payload)
        assert page.title().startswith(payload)
        assert_inert(page, f"conversation titled {payload!r}")


def test_markdown_edge_cases_in_answers_stay_inert(page, server):
    from playwright.sync_api import expect

    open_ready(page, "/")
    cid = api(page, "POST", "/api/v1/conversations", {"title": "markdown"})["json"]["id"]
    for payload in MARKDOWN_PAYLOADS:
        add_answer(server, cid, f"Answer:\n\n{payload}\n\n- in a list: {payload}")
    open_ready(page, f"/c/{cid}")
    expect(page.locator(".message.assistant")).to_have_count(len(MARKDOWN_PAYLOADS))
    for i in range(page.locator("#messages a").count()):
        page.locator("#messages a").nth(i).hover()
    assert_inert(page, "answers")
    anchors = page.evaluate(
        "[...document.querySelectorAll('#messages a')].map(a => [a.getAttribute('href'), a.getAttributeNames()])"
    )
    for href, names in anchors:
        assert href.startswith(("https://", "http://", "mailto:")), href
        # A quote in the URL stays inside href (escaped), never opening an attribute of its own.
        assert set(names) <= {"href", "target", "rel"}, (href, names)
    text = page.locator("#messages").inner_text()
    assert "JaVaScRiPt:window.__xss" in text and "<script>window.__xss='blockquote'</script>" in text


def test_spam_page_history_and_explanation_stay_inert(page):
    from playwright.sync_api import expect

    open_ready(page, "/spam")
    payload = " ".join(PAYLOADS[:4])
    page.fill("#spam-text", payload)
    page.click("#spam-check")
    expect(page.locator("#spam-explain")).to_have_attribute("data-state", "done")
    expect(page.locator("#spam-history li")).to_have_count(1)
    assert "<script>window.__xss='script'</script>" in page.locator("#spam-history").inner_text()
    for i in range(min(page.locator("#spam-explain .tok").count(), 40)):
        page.locator("#spam-explain .tok").nth(i).hover()
    assert_inert(page, "spam page")


def test_lab_pages_stay_inert(page, server):
    from playwright.sync_api import expect

    text = " ".join(PAYLOADS[:3])
    open_ready(page, "/lab/tokens")
    page.fill("#tok-text", " ".join(PAYLOADS))
    page.click("#tok-run")
    # The page shows a default text at first: wait for the payload's chips.
    expect(page.locator(".tok-column").first.locator(".chips")).to_contain_text("onerror")
    assert {"<", "script", ">", "img"} <= set(page.locator(".tok-column").first.locator(".chips .tok").all_text_contents())
    page.click("#merge-toggle")
    page.fill("#merge-word", "<img/onerror=alert(1)>")
    page.press("#merge-word", "Enter")
    expect(page.locator("#merge-steps")).to_contain_text("onerror")
    assert_inert(page, "tokenizer")

    open_ready(page, "/lab/attention")
    page.fill("#att-text", text)
    page.click("#att-run")
    expect(page.locator("#att-strip .tok").first).to_be_visible()
    expect(page.locator("#att-strip")).to_contain_text("script")
    page.locator("#att-strip .tok").last.hover()
    assert_inert(page, "attention")

    open_ready(page, "/lab/next-token")
    page.fill("#nt-text", text)
    page.click("#nt-run")
    expect(page.locator("#nt-prompt")).to_contain_text("script")
    expect(page.locator("#nt-bars .bar-row").first).to_be_visible()
    assert_inert(page, "next token")

    open_ready(page, "/lab/embeddings")
    words = ["<b>bold</b>", "<img src=x onerror=alert(1)>", "<script>y</script>"]
    page.fill("#emb-words", ", ".join(words))
    page.click("#emb-run")
    expect(page.locator("#emb-plot circle")).to_have_count(3)
    assert sorted(page.locator("#emb-plot .point-label").all_text_contents()) == sorted(words)
    assert_inert(page, "embeddings")

    cid = api(page, "POST", "/api/v1/conversations", {"title": "tokens"})["json"]["id"]
    add_answer(server, cid, " ".join(PAYLOADS))
    open_ready(page, f"/lab/next-token?conversation={cid}")
    expect(page.locator("#cv-answers .conf-chips .tok").first).to_be_visible()
    expect(page.locator("#cv-answers")).to_contain_text("script")
    assert_inert(page, "stored answer's tokens")


def test_the_checks_see_an_injection(page):
    """The checks above can fail: HTML put in with innerHTML is reported, and the CSP blocks its handler."""
    open_ready(page, "/spam")
    page.evaluate("""document.querySelector('#spam-history').innerHTML = '<img src=x onerror="window.__xss=1">'""")
    page.wait_for_timeout(300)
    assert page.evaluate(INJECTION_REPORT) == ["IMG onerror"]  # and window.__xss unset: the CSP held
    assert any(CSP in p for p in problems(page))
