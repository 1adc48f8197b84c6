"""The background fine-tunes' status line (issue 20) in headless Chromium: a running job's progress
and a failed job's log on the chat and spam pages, and the line following a job to its end.

The status files are written here as training.progress writes them; tests/app/test_jobs.py runs
real child processes. Skipped where /usr/bin/chromium or Playwright is missing.
"""

from __future__ import annotations

import json
import time

from browser_testing import BROWSER_MARKS, browser_server, open_ready, watched_page

pytestmark = BROWSER_MARKS


def write(home, name: str, **status) -> None:
    (home / "jobs").mkdir(parents=True, exist_ok=True)
    (home / "jobs" / f"{name}.json").write_text(json.dumps({**status, "updated_at": time.time()}))


def test_the_status_line_follows_the_jobs(browser, tmp_path, chat_checkpoint, classifier_checkpoint):
    home = tmp_path / "home"
    log = home / "jobs" / "spam-classifier.log"
    write(home, "spam-classifier", state="failed", order=0, title="spam classifier", role="classifier",
          message="could not download sms_spam_collection.zip: offline", log=str(log))
    write(home, "smollm2-135m-chat", state="running", order=1, title="instruction model", role="chat",
          fraction=0.43, eta_seconds=370, checkpoint=str(chat_checkpoint))
    with browser_server(home, chat_checkpoint, classifier_checkpoint) as server, \
            watched_page(browser, server, height=800) as page:
        for path in ("/spam", "/"):
            open_ready(page, path)
            lines = page.locator("#job-status .job-line")
            lines.first.wait_for()
            assert lines.all_inner_texts() == [
                f"spam classifier: failed: could not download sms_spam_collection.zip: offline (log: {log})",
                "instruction model: training, 43%, about 6 min left",
            ]
            assert lines.nth(0).get_attribute("data-state") == "failed"
            assert page.locator("#job-status progress").evaluate("bar => bar.value") == 0.43

        # The job ends on the chat page: the service loads what it made and the line says so.
        write(home, "smollm2-135m-chat", state="done", order=1, title="instruction model", role="chat",
              fraction=1.0, eta_seconds=0, checkpoint=str(chat_checkpoint))
        page.locator("#job-status .job-line", has_text="instruction model: ready").wait_for(timeout=30_000)
        assert page.locator("#job-status progress").count() == 0
        assert page.reports.errors == [] and page.reports.csp_violations() == []
