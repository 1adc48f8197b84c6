"""Every browser page links to the other sections, so the chat, the spam check and the Lab are one site."""

from __future__ import annotations

import re

import pytest

PAGES = ["/", "/spam", "/lab", "/lab/tokens", "/lab/levels", "/lab/attention", "/lab/next-token", "/lab/few-shot",
         "/lab/embeddings"]
SECTIONS = ["/", "/spam", "/lab", "/docs"]


@pytest.mark.parametrize("path", PAGES)
def test_each_page_links_to_each_other_section(client, path):
    page = client.get(path)
    assert page.status_code == 200, page.text
    links = set(re.findall(r'<a [^>]*href="([^"]+)"', page.text))
    others = set(SECTIONS) - {path}
    assert others <= links, f"{path} lacks links to {others - links}"
