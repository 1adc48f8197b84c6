"""The spam page's explanation in headless Chromium, on a classifier whose spam words are known
(tests/keyword_classifier.py): the legend says what the colours mean, red marks exactly the words
that pushed towards spam and green the ones towards ham, and the list under the tokens names the
words behind the verdict the badge shows, for a spam verdict and for a ham one.

Skipped where Chromium (/usr/bin/chromium or $SCRATCHGPT_CHROMIUM) or Playwright is missing.
"""

from __future__ import annotations

import pytest
from browser_testing import BROWSER_MARKS, browser_server, checked_page, open_ready
from keyword_classifier import save_keyword_classifier

pytestmark = BROWSER_MARKS

SPAM = "Hi you won a FREE prize, claim it"
HAM = "see you at lunch then, bring a FREE book"  # one spam word in eight: ham


@pytest.fixture(scope="module")
def server(tmp_path_factory, chat_checkpoint, gpt2_tok):
    home = tmp_path_factory.mktemp("spam-explain-home")
    classifier, _ = save_keyword_classifier(home / "keyword-spam", gpt2_tok)
    with browser_server(home, chat_checkpoint, classifier, chat_enabled=False) as live:
        yield live


@pytest.fixture
def page(browser, server):
    # A forward pass of a real model on a busy CPU can take seconds.
    with checked_page(browser, server, timeout_ms=30_000) as page:
        yield page


def check(page, text: str):
    from playwright.sync_api import expect

    page.fill("#spam-text", text)
    page.click("#spam-check")
    explain = page.locator("#spam-explain")
    expect(explain).to_have_attribute("data-state", "done")
    return explain


def colour(locator) -> tuple[int, int, int]:
    rgb = locator.evaluate("el => getComputedStyle(el).backgroundColor")
    return tuple(int(float(v)) for v in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3])


def test_legend_says_what_the_colours_mean_and_the_chips_use_them(page):
    from playwright.sync_api import expect

    open_ready(page, "/spam")
    explain = check(page, SPAM)
    legend = page.locator("#spam-explain-legend")
    expect(legend).to_be_visible()
    expect(legend.locator("[data-towards='spam']")).to_have_text("pushed towards spam")
    expect(legend.locator("[data-towards='ham']")).to_have_text("pushed towards ham")
    red, green = colour(legend.locator(".legend-spam")), colour(legend.locator(".legend-ham"))
    assert red[0] > red[1] and green[1] > green[0]  # red is red and green is green
    chips = explain.locator(".explain-chips .tok")
    towards = [chips.nth(i).get_attribute("data-towards") for i in range(chips.count())]
    words = [chips.nth(i).inner_text() for i in range(chips.count())]
    # The known answer: the words holding FREE, prize and claim push towards spam, every other word towards ham.
    spam_words = {"␣FREE", "␣prize", "␣claim"}
    word_of = [int(chips.nth(i).get_attribute("data-word")) for i in range(chips.count())]
    spammy = {word_of[i] for i, w in enumerate(words) if w in spam_words}
    assert towards == ["spam" if word_of[i] in spammy else "ham" for i in range(len(words))]
    for i in range(chips.count()):
        r, g, _ = colour(chips.nth(i))
        assert (r > g) == (towards[i] == "spam"), (words[i], towards[i], (r, g))
    expect(explain.locator(".explain-note")).to_contain_text("red words pushed towards spam, green words towards ham")
    # Attention is another measure: its own note, and the push legend goes away.
    explain.locator(".seg-btn[data-mode='attention']").click()
    expect(legend).to_be_hidden()
    expect(explain.locator(".explain-note")).to_contain_text("not which way")


@pytest.mark.parametrize("text, verdict, other", [(SPAM, "spam", "ham"), (HAM, "ham", "spam")])
def test_the_list_names_the_words_behind_the_badge_verdict(page, text, verdict, other):
    from playwright.sync_api import expect

    open_ready(page, "/spam")
    explain = check(page, text)
    expect(page.locator("#spam-result")).to_have_attribute("data-label", verdict)  # the badge, from /classify
    expect(explain).to_have_attribute("data-verdict", verdict)
    top = explain.locator(".explain-top")
    expect(top).to_contain_text(f"Strongest towards {verdict} (the verdict):")
    expect(top).not_to_contain_text(f"towards {other}")
    against = explain.locator(".explain-against")
    expect(against).to_contain_text(f"Pulling the other way, towards {other}:")
    if verdict == "spam":
        for word in ("FREE", "prize"):
            expect(top).to_contain_text(word)
    else:
        expect(against).to_contain_text("“FREE”")
        expect(top).not_to_contain_text("FREE")
