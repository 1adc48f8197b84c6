"""The chat UI of issue 21 in headless Chromium: Markdown through the vendored libraries (tables,
highlighted code, copy buttons), icons that need no emoji font, answers cut by the token limit,
the drawer and top bars on a phone's screen, the API docs with no network; editing a question and
sending it again, regenerated answers to flip through, continuing a cut answer, switching
conversations during an answer, and settings held to the server's limits.

Skipped where /usr/bin/chromium or Playwright is missing (`apt-get install chromium`).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from app_testing import TokenGate
from browser_testing import BROWSER_MARKS, browser_server, checked_page, open_ready

from app.api.routes.lab import LAB_PAGES

pytestmark = BROWSER_MARKS

PHONE = {"width": 390, "height": 844}
OPEN = re.compile(r"\bsidebar-open\b")
TOOL_PAGES = ["/spam", "/lab", *(f"/lab/{name}" for name in LAB_PAGES)]
ANSWER = """Here is a table:

| Model | Parameters | Notes |
|:------|-----------:|:-----:|
| GPT-2 small | 124M | `gpt2` |
| SmolLM2 | 135M | instruct |

And some code:

```python
def greet(name):
    return f"hello {name}"  # <b>not bold</b>
```
"""

# Characters that only an emoji or symbol font draws: arrows, technical and geometric shapes,
# miscellaneous symbols, dingbats, and the emoji planes (with the emoji variation selector).
SYMBOL_CHARS = r"[\u2190-\u2bff\u{1f000}-\u{1faff}\ufe0f]"
# Where a page draws its own chrome: not what a user or a model wrote, and not the Lab's
# measurements, which show a token's space as "␣" on purpose (the next-token step button
# names its token).
CHAT_CHROME = "body"
TOOL_CHROME = ".topbar, .lab-tabs, .lab-cards, button, .banner, h1, h2, h3, label"
# Text in the chrome under `roots` (hidden elements too), with ::before/::after content.
CHROME_SYMBOLS = """([pattern, roots]) => {
  const re = new RegExp(pattern, "u");
  const skip = "textarea, input, #messages .content, .conversation-link, #chat-title, #nt-chosen";
  const found = [];
  for (const root of document.querySelectorAll(roots)) {
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      if (node.parentElement.closest(skip)) continue;
      if (re.test(node.textContent)) found.push(node.textContent.trim());
    }
  }
  for (const el of document.querySelectorAll(roots.split(",").map((r) => `${r}, ${r} *`).join(","))) {
    if (el.closest(skip)) continue;
    for (const pseudo of ["::before", "::after"]) {
      const content = getComputedStyle(el, pseudo).content;
      if (content && content !== "none" && content !== "normal" && re.test(content)) found.push(`${el.className}${pseudo} ${content}`);
    }
  }
  return found;
}"""
ICON_SOURCES = """() => [...document.querySelectorAll(".icon")].filter((el) => el.getClientRects().length).map(
  (el) => [el.className, getComputedStyle(el).maskImage || getComputedStyle(el).webkitMaskImage, el.getBoundingClientRect().width])"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, chat_checkpoint, classifier_checkpoint):
    # The tiny chat model under the default model's long name, which the phone's header must fit.
    named = tmp_path_factory.mktemp("ckpt") / "long-name"
    shutil.copytree(chat_checkpoint, named)
    config = json.loads((named / "config.json").read_text())
    config["metadata"]["name"] = "smollm2-135m-instruct"
    (named / "config.json").write_text(json.dumps(config))
    # 6 tokens: the tiny random model never ends an answer itself, so each is cut by the limit.
    with browser_server(tmp_path_factory.mktemp("ui-home"), named, classifier_checkpoint,
                        default_max_new_tokens=6) as live:
        yield live


@pytest.fixture
def page(browser, server):
    with checked_page(browser, server, timeout_ms=20_000) as page:
        yield page


def open_settled(page, path: str) -> None:
    """Open a tool page and let its first measurement arrive (the Lab's overview has no script)."""
    page.goto(path)
    page.wait_for_load_state("networkidle")


def new_conversation(page, title: str) -> str:
    return page.evaluate(
        """async (title) => {
            const csrf = document.querySelector('meta[name="csrf-token"]').content;
            const r = await fetch("/api/v1/conversations", {method: "POST", body: JSON.stringify({title}),
                headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf}});
            return (await r.json()).id;
        }""",
        title,
    )


def send(page, text: str):
    from playwright.sync_api import expect

    page.fill("#msg", text)
    page.press("#msg", "Enter")
    answer = page.locator(".message.assistant").last
    expect(answer).to_have_attribute("data-status", "complete")
    return answer


def test_tables_highlighted_code_and_copy_buttons(page, server):
    from playwright.sync_api import expect

    from app.db import crud

    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    open_ready(page, "/")
    cid = new_conversation(page, "markdown")
    with server.app.state.sessions() as session:
        crud.add_message(session, cid, "user", "a table and some code, please")
        crud.add_message(session, cid, "assistant", ANSWER)
    open_ready(page, f"/c/{cid}")
    content = page.locator(".message.assistant .content")

    table = content.locator("table")
    expect(table.locator("th")).to_have_text(["Model", "Parameters", "Notes"])
    expect(table.locator("tbody tr")).to_have_count(2)
    expect(table.locator("tbody tr").first.locator("td")).to_have_text(["GPT-2 small", "124M", "gpt2"])
    # Alignment by class, since the CSP refuses style attributes.
    assert table.locator("td").nth(1).evaluate("td => getComputedStyle(td).textAlign") == "right"
    assert table.locator("td").nth(2).evaluate("td => getComputedStyle(td).textAlign") == "center"
    assert "|" not in content.inner_text()

    code = content.locator("pre code.language-python")
    expect(code.locator(".hljs-keyword").first).to_have_text("def")
    expect(code.locator(".hljs-string").first).to_contain_text("hello")
    expect(code).to_contain_text("<b>not bold</b>")  # text inside code, not markup
    assert code.locator("b").count() == 0
    expect(content.locator(".code-lang")).to_have_text("python")

    content.locator(".code-block .copy").click()
    expect(content.locator(".code-block .copy")).to_have_attribute("data-copied", "true")
    assert page.evaluate("navigator.clipboard.readText()") == 'def greet(name):\n    return f"hello {name}"  # <b>not bold</b>'
    answer = page.locator(".message.assistant")
    answer.hover()
    answer.locator(".meta .copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == ANSWER  # the Markdown as written


def test_answers_cut_by_the_token_limit_are_marked(page):
    from playwright.sync_api import expect

    open_ready(page, "/")
    answer = send(page, "Tell me a long story")
    expect(answer).to_have_attribute("data-finish", "length")
    expect(answer.locator(".meta-text .ending-cut")).to_have_text("cut off at the token limit")
    expect(answer.locator(".meta-text .ending-cut .icon-cut")).to_have_count(1)
    page.reload()  # the mark comes from the stored finish_reason too
    page.wait_for_selector("body[data-ready='true']")
    expect(page.locator(".message.assistant .ending-cut")).to_have_text("cut off at the token limit")


def assert_icons_need_no_font(page, where: str, roots: str = CHAT_CHROME) -> None:
    found = page.evaluate(CHROME_SYMBOLS, [SYMBOL_CHARS, roots])
    assert found == [], f"{where}: drawn with characters an emoji or symbol font must supply: {found}"
    for class_name, mask, width in page.evaluate(ICON_SOURCES):
        assert "/static/icons/" in mask and ".svg" in mask and width > 0, (where, class_name, mask, width)


def test_icons_are_svg_not_emoji(page, server):
    """A machine without an emoji font shows an empty box for each emoji: no page may rely on one."""
    from playwright.sync_api import expect

    open_ready(page, "/")
    answer = send(page, "first")
    item = page.locator(".conversation-item").first
    item.hover()
    buttons = [item.locator(".rename"), item.locator(".delete"), page.locator("#settings-button"), answer.locator(".copy"),
               page.locator("#stop"), page.locator("#banner-close"), page.locator("#toggle-sidebar")]
    for button in buttons:
        expect(button.locator(".icon")).to_have_count(1)
        assert button.get_attribute("aria-label")  # the name a screen reader says
    assert item.locator(".delete").inner_text().strip() == ""
    assert_icons_need_no_font(page, "chat")
    for url in {mask.split('"')[1] for _, mask, _ in page.evaluate(ICON_SOURCES)}:
        response = page.request.get(url)
        assert response.status == 200 and response.headers["content-type"].startswith("image/svg+xml"), url
    for path in TOOL_PAGES:
        open_settled(page, path)
        assert_icons_need_no_font(page, path, TOOL_CHROME)


def test_phone_drawer_title_and_top_bars(page):
    from playwright.sync_api import expect

    page.set_viewport_size(PHONE)
    open_ready(page, "/")
    expect(page.locator("#model-status")).to_have_text("smollm2-135m-instruct")
    title = page.locator("#chat-title")
    expect(title).to_have_text("New chat")
    assert title.evaluate("h => h.scrollWidth <= h.clientWidth"), "the title is cut off"
    expect(page.locator("#sidebar")).not_to_be_in_viewport()

    def open_drawer() -> None:
        page.click("#toggle-sidebar")
        expect(page.locator("body")).to_have_class(OPEN)
        page.wait_for_timeout(300)  # the slide-in transition

    def assert_closed(how: str) -> None:
        expect(page.locator("body"), how).not_to_have_class(OPEN)
        expect(page.locator("#toggle-sidebar")).to_have_attribute("aria-expanded", "false")

    open_drawer()
    page.click("#new-chat")
    assert_closed("after + New chat")
    open_drawer()
    page.mouse.click(PHONE["width"] - 20, PHONE["height"] // 2)  # beside the drawer, over the chat
    assert_closed("after a tap outside")
    open_drawer()
    page.keyboard.press("Escape")
    assert_closed("after Escape")
    page.click("#toggle-sidebar")  # the button is reachable again, not under the drawer
    expect(page.locator("body")).to_have_class(OPEN)

    for path in TOOL_PAGES:
        open_settled(page, path)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} scrolls sideways by {overflow}px at {PHONE['width']}px"


def test_api_docs_work_with_no_network(page, server):
    from playwright.sync_api import expect

    elsewhere: list[str] = []

    def only_ours(route) -> None:
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort("internetdisconnected")

    page.context.route("**/*", only_ours)
    page.goto("/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("scratchgpt")
    expect(page.locator(".opblock-summary-path[data-path='/api/v1/classify']")).to_have_count(1)
    assert elsewhere == []


# --- edit and resend, alternatives, continue, switching, settings ----------------------------


def test_edit_and_resend_replaces_what_followed(page):
    from playwright.sync_api import expect

    open_ready(page, "/")
    send(page, "first question")
    send(page, "second question")
    expect(page.locator(".message")).to_have_count(4)
    first = page.locator(".message.user").first
    first.hover()
    first.locator(".edit").click()
    page.fill(".edit-input", "first question, edited")
    page.press(".edit-input", "Enter")
    expect(page.locator(".message")).to_have_count(2)
    expect(page.locator(".message.assistant")).to_have_attribute("data-status", "complete")
    expect(page.locator(".message.user .content")).to_have_text("first question, edited")
    page.reload()  # the server stored the same
    page.wait_for_selector("body[data-ready='true']")
    expect(page.locator(".message")).to_have_count(2)
    expect(page.locator(".message.user .content")).to_have_text("first question, edited")


def test_regenerated_answers_are_kept_to_flip_through(page):
    from playwright.sync_api import expect

    open_ready(page, "/")
    first = send(page, "pick a word")
    first_id = first.get_attribute("data-id")
    page.locator(".message.assistant .regenerate").click()
    answer = page.locator(".message.assistant")
    expect(answer.locator(".alt-position")).to_have_text("2/2")
    expect(answer).to_have_attribute("data-status", "complete")
    assert answer.get_attribute("data-id") != first_id
    expect(answer.locator(".alt-next")).to_be_disabled()
    answer.locator(".alt-previous").click()
    expect(answer.locator(".alt-position")).to_have_text("1/2")
    expect(page.locator(".message.assistant")).to_have_attribute("data-id", first_id)
    page.reload()  # the choice is stored: it is what the next prompt reads
    page.wait_for_selector("body[data-ready='true']")
    expect(page.locator(".message.assistant")).to_have_attribute("data-id", first_id)
    expect(page.locator(".message.assistant .alt-position")).to_have_text("1/2")


def test_continue_writes_on_a_cut_answer(page):
    from playwright.sync_api import expect

    open_ready(page, "/")
    cut = send(page, "Tell me a long story")
    expect(cut).to_have_attribute("data-finish", "length")
    before = cut.evaluate("a => a.message.content")
    cut.locator(".continue").click()
    expect(cut.locator(".meta-text")).to_contain_text("12 tokens")
    expect(cut).to_have_attribute("data-status", "complete")
    assert page.locator(".message.assistant").count() == 1
    after = cut.evaluate("a => a.message.content")
    assert after.startswith(before) and len(after) > len(before)


def test_switching_conversations_during_an_answer(page, server):
    """The answer goes on on the server while another conversation is open, and is there, whole, on return."""
    from playwright.sync_api import expect

    open_ready(page, "/")
    cid = page.evaluate(
        """async () => {
            const csrf = document.querySelector('meta[name="csrf-token"]').content;
            const r = await fetch("/api/v1/conversations", {method: "POST", body: JSON.stringify({max_new_tokens: 40}),
                headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf}});
            return (await r.json()).id;
        }"""
    )
    open_ready(page, f"/c/{cid}")
    worker = server.app.state.models.slots["chat"].worker
    with TokenGate(worker, hold_at=4) as gate:
        page.fill("#msg", "a long answer, please")
        page.press("#msg", "Enter")
        gate.wait_held()
        expect(page.locator("#stop")).to_be_visible()
        page.click("#new-chat")
        expect(page.locator("#chat-title")).to_have_text("New chat")
        expect(page.locator(".message")).to_have_count(0)
        expect(page.locator("#send")).to_be_visible()
        page.locator(f".conversation-item[data-id='{cid}'] .conversation-link").click()
        answer = page.locator(".message.assistant")
        expect(answer).to_have_attribute("data-status", "streaming")
        expect(page.locator("#stop")).to_be_visible()  # followed again: it can be stopped from here
        gate.release()
        expect(answer).to_have_attribute("data-status", "complete")
    expect(answer.locator(".meta-text")).to_contain_text("40 tokens")
    expect(page.locator(".message")).to_have_count(2)
    stored = page.evaluate(f"fetch('/api/v1/conversations/{cid}').then(r => r.json())")
    assert stored["messages"][-1]["content"] == answer.evaluate("a => a.message.content")
    assert stored["messages"][-1]["completion_tokens"] == 40


def test_settings_follow_the_servers_limits_and_defaults(page):
    from playwright.sync_api import expect

    open_ready(page, "/")
    page.click("#settings-button")
    # What a new chat really gets from this server, not an empty field.
    expect(page.locator("#set-system")).to_have_value("You are a helpful assistant.")
    expect(page.locator("#set-max-tokens")).to_have_attribute("max", "2048")
    expect(page.locator("#max-tokens-limit")).to_have_text("(up to 2048)")
    page.fill("#set-max-tokens", "5000")
    page.click("#settings-save")
    expect(page.locator("#settings-error")).to_have_text("Max new tokens must be at least 1 and at most 2048 on this server.")
    expect(page.locator("#settings-dialog")).to_have_attribute("open", "")
    assert page.evaluate("localStorage.getItem('scratchgpt.newChatSettings')") is None
    # A value saved under other limits (an older server) does not make new chats fail.
    page.evaluate("localStorage.setItem('scratchgpt.newChatSettings', JSON.stringify({max_new_tokens: 5000}))")
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    send(page, "hello")
