"""Screenshots of the chat and spam pages for docs/screenshots/, taken in headless Chromium
(desktop light and dark, and the chat on a phone's 390x844).

    .venv/bin/python tests/app/screenshots.py --chat-model [NAME=]DIR [--chat-model ...] --classifier-checkpoint DIR

The pages are driven like a user would: real messages to the served chat model, real texts to
the served classifier, on a throwaway database. Not a test (no test_ prefix); run by hand when
the UI changes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: waiting.py, which app_testing uses
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app_testing import LiveServer  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

CHAT_TURNS = [
    "Write a Python function that checks whether a word is a palindrome.",
    "What are three things to see in Paris? Answer as a short list.",
]
SPAM_TEXTS = [
    "Had a great time at dinner, thanks! Are we still on for the hike on Saturday?",
    "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward! "
    "To claim call 09061701461. Claim code KL341. Valid 12 hours only.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chat-model", action="append", required=True,
                        help="a chat model to serve, [NAME=]DIR (SCRATCHGPT_CHAT_MODELS' form); the first is the default")
    parser.add_argument("--classifier-checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    args = parser.parse_args()

    from playwright.sync_api import expect, sync_playwright

    from app.settings import Settings

    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="scratchgpt-shots-"))
    # Each model decodes with its own defaults (its checkpoint's generation_defaults), as served.
    settings = Settings(home=home, chat_models=args.chat_model, classifier_checkpoint=args.classifier_checkpoint,
                        device="cpu", log_json=False, default_max_new_tokens=args.max_new_tokens,
                        torch_threads=args.threads)
    with LiveServer(settings) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        state = None  # the dark pass reuses the light pass's session: conversations belong to their owner
        for scheme in ("light", "dark"):
            context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 820},
                                          device_scale_factor=1, color_scheme=scheme, storage_state=state)
            page = context.new_page()
            page.goto("/")
            page.wait_for_selector("body[data-ready='true']")
            if scheme == "light":
                for turn in CHAT_TURNS:
                    page.fill("#msg", turn)
                    page.press("#msg", "Enter")
                    expect(page.locator(".message.assistant").last).to_have_attribute(
                        "data-status", "complete", timeout=600_000)
                # A second answer to the last question: the first is kept, "< 2/2 >" flips between them.
                page.locator(".message.assistant .regenerate").click()
                expect(page.locator(".message.assistant").last.locator(".alt-position")).to_have_text(
                    "2/2", timeout=600_000)
                conversation = page.url
                state = context.storage_state()
            else:
                page.goto(conversation)
                page.wait_for_selector("body[data-ready='true']")
            page.wait_for_timeout(300)
            page.screenshot(path=str(args.out / f"chat-{scheme}.png"))
            print("wrote", args.out / f"chat-{scheme}.png")
            if scheme == "light":
                page.set_viewport_size({"width": 390, "height": 844})
                page.wait_for_timeout(300)
                page.screenshot(path=str(args.out / "chat-mobile.png"))
                print("wrote", args.out / "chat-mobile.png")
                page.set_viewport_size({"width": 1280, "height": 820})

            page.goto("/spam")
            page.wait_for_selector("body[data-ready='true']")
            for text in SPAM_TEXTS:
                page.fill("#spam-text", text)
                page.click("#spam-check")
                expect(page.locator("#spam-check")).to_have_text("Check message", timeout=60_000)
            page.wait_for_load_state("networkidle")  # the Lab's explanation of the last result
            page.wait_for_timeout(600)  # the meter's transition
            page.screenshot(path=str(args.out / f"spam-{scheme}.png"), full_page=True)
            print("wrote", args.out / f"spam-{scheme}.png")
            context.close()
        browser.close()


if __name__ == "__main__":
    main()
