"""The Lab in headless Chromium (Playwright + Debian's chromium): each page opens and its chart renders.

Skipped where Chromium (/usr/bin/chromium or $SCRATCHGPT_CHROMIUM) or Playwright is missing (`apt-get install chromium`).

The same tests make the screenshots in docs/screenshots/: set SCRATCHGPT_LAB_SCREENSHOTS to a
directory, and SCRATCHGPT_LAB_CHAT_CHECKPOINT / SCRATCHGPT_LAB_CLASSIFIER_CHECKPOINT to serve real
models instead of the tiny test ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser_testing import BROWSER_MARKS, browser_server, checked_page, open_ready

SHOTS = os.environ.get("SCRATCHGPT_LAB_SCREENSHOTS")

pytestmark = BROWSER_MARKS


@pytest.fixture(scope="module")
def server(tmp_path_factory, chat_checkpoint, classifier_checkpoint):
    with browser_server(
        tmp_path_factory.mktemp("lab-browser-home"),
        os.environ.get("SCRATCHGPT_LAB_CHAT_CHECKPOINT") or chat_checkpoint,
        os.environ.get("SCRATCHGPT_LAB_CLASSIFIER_CHECKPOINT") or classifier_checkpoint,
        default_max_new_tokens=24,
    ) as live:
        yield live


@pytest.fixture
def page(browser, server):
    # A forward pass of a real model on a busy CPU can take seconds.
    with checked_page(browser, server, timeout_ms=30_000) as page:
        yield page


def shoot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"lab-{name}.png"), full_page=True)


def test_overview_links_every_tool(page):
    page.goto("/lab")
    cards = page.locator(".lab-card")
    assert cards.count() == 7
    shoot(page, "overview")
    page.click("a.lab-card[href='/lab/tokens']")
    page.wait_for_selector("body[data-ready='true']")
    assert page.url.endswith("/lab/tokens")


def test_tokenizer_chips_columns_and_merges(page):
    from playwright.sync_api import expect

    open_ready(page, "/lab/tokens")
    columns = page.locator(".tok-column")
    expect(columns).to_have_count(2)
    for i in range(2):
        badge = columns.nth(i).locator(".count-badge").inner_text()
        assert int(badge.split()[0]) == columns.nth(i).locator(".chips .tok").count() > 5
    page.fill("#tok-text", "Hello world")
    expect(columns.first.locator(".chips .tok")).to_have_count(2)  # "Hello", " world"
    expect(columns.first.locator(".tok").nth(1)).to_have_text("␣world")
    page.fill("#tok-text", "Tokenization isn't magic: \"unbelievably\" and 1234567 become pieces. Café, naïve, Ελλάδα and 🙂 are bytes first.")
    page.click("#tok-run")
    page.click("#merge-toggle")
    steps = page.locator("#merge-steps .merge-step")
    expect(steps.first).to_be_visible()
    assert steps.count() > 3
    last = steps.last.locator(".tok")
    assert last.count() < steps.first.locator(".tok").count()  # merging shrank the parts
    assert page.locator("#merge-steps .tok-new").count() == steps.count() - 1  # each merge is marked
    shoot(page, "tokens")


def test_attention_heatmap_hover_and_heads(page):
    from playwright.sync_api import expect

    open_ready(page, "/lab/attention")
    n = page.locator("#att-strip .tok").count()
    assert n > 5
    cells = page.locator("#att-heatmap rect.cell")
    expect(cells).to_have_count(n * (n + 1) // 2)  # causal: the lower triangle
    heads = int(page.locator("#att-head option").count()) - 1
    expect(page.locator("#att-heads .head-thumb")).to_have_count(heads + 1)
    # Hovering a token lights up what it attends to: the tokens up to it, not after it.
    page.hover(f"#att-strip .tok >> nth={n - 1}")
    expect(page.locator("#att-readout")).to_contain_text("attends most to")
    first_bg = page.locator("#att-strip .tok").first.evaluate("el => el.style.background")
    assert first_bg.startswith("rgba")
    page.hover("#att-strip .tok >> nth=1")
    assert page.locator("#att-strip .tok").last.evaluate("el => el.style.background") == ""
    page.select_option("#att-layer", "1")
    expect(page.locator("#att-title")).to_contain_text("Layer 1")
    page.locator("#att-heads .head-thumb").nth(1).click()
    expect(page.locator("#att-title")).to_contain_text("head 0")
    page.locator("#att-strip .tok").nth(n - 1).click()  # pin a row for the screenshot
    shoot(page, "attention")


def test_next_token_bars_and_step(page):
    from playwright.sync_api import expect

    open_ready(page, "/lab/next-token")
    bars = page.locator("#nt-bars .bar-row")
    expect(bars).to_have_count(12)
    before = page.locator("#nt-prompt .tok").count()
    bars.nth(2).click()
    chosen = page.locator("#nt-chosen").inner_text()
    page.click("#nt-step")
    expect(page.locator("#nt-prompt .tok")).to_have_count(before + 1)
    assert f"“{page.locator('#nt-prompt .tok').last.inner_text()}”" == chosen
    expect(page.locator("#nt-entropy")).to_contain_text("nats")
    page.fill("#nt-top-k", "3")
    page.locator("#nt-top-k").dispatch_event("change")
    expect(page.locator("#nt-bars .bar-row.filtered")).to_have_count(9)


def test_stored_answer_coloured_by_confidence(page):
    from playwright.sync_api import expect

    open_ready(page, "/lab/next-token")
    # Chat like the chat page does (this browser session owns the conversation), then look at the answer.
    cid = page.evaluate(
        """async () => {
            const csrf = document.querySelector('meta[name="csrf-token"]').content;
            const headers = {"Content-Type": "application/json", "X-CSRF-Token": csrf};
            const c = await (await fetch("/api/v1/conversations", {method: "POST", headers,
                body: JSON.stringify({title: "Colours", temperature: 0, max_new_tokens: 24})})).json();
            const r = await fetch(`/api/v1/conversations/${c.id}/messages`, {method: "POST", headers,
                body: JSON.stringify({content: "Name three colours of the rainbow."})});
            await r.text();
            return c.id;
        }"""
    )
    open_ready(page, f"/lab/next-token?conversation={cid}")
    chips = page.locator("#cv-answers .conf-chips .tok")
    expect(chips.first).to_be_visible()
    assert chips.count() > 3
    assert chips.first.evaluate("el => el.style.borderBottomColor").startswith("rgb")
    page.locator("#cv-answers").scroll_into_view_if_needed()
    shoot(page, "next-token")


def test_embeddings_scatter(page):
    from playwright.sync_api import expect

    open_ready(page, "/lab/embeddings")
    expect(page.locator("#emb-plot circle")).to_have_count(16)
    labels = page.locator("#emb-plot .point-label").all_text_contents()
    assert {"king", "Paris", "dog", "four"} <= set(labels)
    assert "% of variance" in page.locator("#emb-plot").text_content()
    shoot(page, "embeddings")
    page.fill("#emb-words", "red, green, blue")
    page.click("#emb-run")
    expect(page.locator("#emb-plot circle")).to_have_count(3)
    page.fill("#emb-words", "alone")
    page.click("#emb-run")
    expect(page.locator("#lab-banner")).to_contain_text("at least 2")


def test_spam_page_explains_the_decision(page):
    from playwright.sync_api import expect

    page.goto("/spam")
    page.wait_for_selector("body[data-ready='true']")
    text = "WINNER!! You have been selected for a £900 prize reward. Call 09061701461 to claim now."
    page.fill("#spam-text", text)
    page.click("#spam-check")
    explain = page.locator("#spam-explain")
    expect(explain).to_have_attribute("data-state", "done", timeout=30_000)
    chips = explain.locator(".explain-chips .tok")
    assert chips.count() > 10
    assert chips.first.evaluate("el => el.style.background").startswith("rgba")
    expect(explain.locator(".explain-note")).to_contain_text("pushed towards")
    shoot(page, "spam-explain")
    explain.locator(".seg-btn[data-mode='attention']").click()
    expect(explain.locator(".explain-note")).to_contain_text("last token")


def test_word_char_bpe_table_and_columns(page):
    from playwright.sync_api import expect

    open_ready(page, "/lab/levels")
    rows = page.locator("#lv-table tbody tr")
    expect(rows).to_have_count(4)  # word, char, BPE trained on the reference, GPT-2
    assert [rows.nth(i).get_attribute("data-key") for i in range(4)] == ["word", "char", "bpe", "gpt2"]
    # The default text has words the reference paragraph lacks: the word level marks them unknown.
    assert int(rows.first.locator("td").nth(3).inner_text()) > 0
    assert rows.nth(2).locator("td").nth(3).inner_text() == "0"
    columns = page.locator("#lv-results .tok-column")
    word_chips = columns.first.locator(".chips .tok")
    assert word_chips.count() == int(rows.first.locator("td").nth(2).inner_text())
    assert columns.first.locator(".tok-special").count() == int(rows.first.locator("td").nth(3).inner_text())
    shoot(page, "levels")
    page.fill("#lv-text", "")
    page.click("#lv-run")
    expect(page.locator("#lab-banner")).to_contain_text("at least 1 character")


def test_few_shot_columns_per_k(page):
    from playwright.sync_api import expect

    open_ready(page, "/lab/few-shot")
    columns = page.locator("#fs-results .fs-column")
    expect(columns).to_have_count(3)
    assert [columns.nth(i).get_attribute("data-k") for i in range(3)] == ["0", "1", "3"]
    for i in range(3):
        expect(columns.nth(i).locator(".fs-label")).to_have_count(2)
        assert columns.nth(i).locator(".fs-predicted").count() == 1
    columns.last.locator(".fs-prompt summary").click()
    expect(columns.last.locator(".fs-prompt pre")).to_contain_text("Sentiment: negative")
    shoot(page, "few-shot")
    page.select_option("#fs-task", "spam")
    page.fill("#fs-shots", "9")
    page.click("#fs-run")
    expect(page.locator("#lab-banner")).to_contain_text("less than or equal to 6")
    assert page.locator("#fs-text").input_value().startswith("Your parcel")
