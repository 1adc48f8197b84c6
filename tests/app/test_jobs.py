"""Background fine-tunes (issue 20): `scratchgpt serve`'s JobRunner runs a job as a child process, the
service shows its progress, serves its checkpoint without a restart when it is done, and reports a
failure with its log while everything else keeps working.

The job is tests/app/fake_job.py: it reports through training.progress as the real jobs do, and holds
at half way until the test opens its gate, so what the service says mid-training is seen, not raced.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from app_testing import running_client
from waiting import wait_until

from app.services.jobs import STALE_SECONDS, summary
from scratchgpt.serve import Job, JobRunner

FAKE_JOB = Path(__file__).with_name("fake_job.py")


def fake_job(home: Path, name: str, role: str, title: str, fail: str | None = None) -> tuple[Job, Path]:
    """The job and its gate (create the file to let the job finish)."""
    jobs, out, gate = home / "jobs", home / "models" / name, home / f"{name}.gate"
    argv = [sys.executable, str(FAKE_JOB), "--progress-file", str(jobs / f"{name}.json"), "--out", str(out),
            "--role", role, "--title", title, "--gate", str(gate)] + (["--fail", fail] if fail else [])
    return Job(name, title, role, argv, out, jobs / f"{name}.json", jobs / f"{name}.log"), gate


def the_job(client, name: str) -> dict:
    jobs = {job["name"]: job for job in client.get("/api/v1/jobs").json()["jobs"]}
    return jobs.get(name, {})


def chat(client, model: str) -> dict:
    reply = client.post("/v1/chat/completions", json={
        "model": model, "temperature": 0, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_missing_classifier_is_trained_in_the_background_and_served_when_done(make_settings, tmp_path):
    home = tmp_path / "home"
    settings = make_settings(home=home, classifier_checkpoint=home / "models" / "spam-classifier")
    job, gate = fake_job(home, "spam-classifier", "classifier", "spam classifier")
    with running_client(settings) as client:
        runner = JobRunner([job], niceness=0).start()
        try:
            wait_until(lambda: the_job(client, "spam-classifier").get("fraction") == 0.5, "the job half way")
            # The classifier's routes answer from the job's progress, with a time to come back.
            reply = client.post("/api/v1/classify", json={"text": "WINNER! Claim your prize"})
            assert reply.status_code == 503
            assert reply.json()["state"] == "training"
            assert re.fullmatch(r"spam classifier: training, 50%, about \d+ (s|min) left", reply.json()["detail"])
            assert 5 <= int(reply.headers["Retry-After"]) <= 600
            ready = client.get("/ready")
            assert ready.status_code == 200  # a fine-tune does not hold readiness back
            shown = ready.json()["jobs"][0]
            assert shown["state"] == "running" and shown["log"] == str(job.log) and shown["role"] == "classifier"
            assert chat(client, "tiny-chat")["choices"][0]["message"]["content"] is not None  # the chat meanwhile

            gate.touch()
            wait_until(lambda: the_job(client, "spam-classifier").get("summary") == "spam classifier: ready",
                       "the classifier served")
            assert runner.wait(30)
        finally:
            runner.stop()
        reply = client.post("/api/v1/classify", json={"text": "WINNER! Claim your prize"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "spam-classifier"
        assert client.get("/ready").json()["models"]["classifier"]["path"] == str(job.checkpoint)
        status = json.loads(job.status.read_text())
        assert status["state"] == "done" and status["fraction"] == 1.0 and status["checkpoint"] == str(job.checkpoint)


def test_a_finished_instruction_model_is_served_first_without_a_restart(make_settings, tmp_path, chat_checkpoint):
    """As `scratchgpt serve` lists them: the instruction-tuned model first (missing while it trains)
    and the base; when the job is done, the tuned model is put into service and new chats get it."""
    home = tmp_path / "home"
    tuned = home / "models" / "smollm2-135m-chat"
    job, gate = fake_job(home, "smollm2-135m-chat", "chat", "instruction model")
    settings = make_settings(home=home, chat_checkpoint=None, chat_models=[str(tuned), str(chat_checkpoint)])
    with running_client(settings) as client:
        assert client.get("/ready").json()["models"]["chat"]["name"] == "tiny-chat"  # the default until then
        runner = JobRunner([job], niceness=0).start()
        try:
            wait_until(lambda: the_job(client, "smollm2-135m-chat").get("fraction") == 0.5, "the job half way")
            assert chat(client, "tiny-chat")  # the base answers while the instruction model trains
            gate.touch()
            wait_until(lambda: the_job(client, "smollm2-135m-chat").get("summary") == "instruction model: ready",
                       "the instruction model served")
        finally:
            runner.stop()
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["smollm2-135m-chat", "tiny-chat"]
        assert chat(client, "smollm2-135m-chat")["model"] == "smollm2-135m-chat"
        created = client.post("/api/v1/conversations", json={}).json()
        assert created["model"] == "smollm2-135m-chat"  # new chats get the tuned model
        assert chat(client, "tiny-chat")  # and the base still answers whoever picks it


def test_a_failed_job_is_reported_with_its_log_and_the_service_carries_on(make_settings, tmp_path):
    home = tmp_path / "home"
    settings = make_settings(home=home, classifier_checkpoint=home / "models" / "spam-classifier")
    reason = "could not download sms_spam_collection.zip: offline"
    job, gate = fake_job(home, "spam-classifier", "classifier", "spam classifier", fail=reason)
    with running_client(settings) as client:
        runner = JobRunner([job], niceness=0).start()
        try:
            wait_until(lambda: the_job(client, "spam-classifier").get("fraction") == 0.5, "the job half way")
            gate.touch()
            assert runner.wait(60)
        finally:
            runner.stop()
        # The job's own last word ("stopped before it finished") may be seen first; the runner's, from the
        # log, follows within a poll.
        expected = f"spam classifier: failed: scratchgpt finetune: error: {reason}"
        shown = wait_until(lambda: (j := the_job(client, "spam-classifier")).get("summary", "").startswith(expected)
                           and j, "the failure reported")
        assert shown["state"] == "failed" and shown["log"] == str(job.log) and f"error: {reason}" in job.log.read_text()
        assert "--spam-data FILE" not in shown["summary"]  # the hint is the runner's, for the real jobs only
        assert shown["summary"].endswith(f"(log: {job.log})")
        # The rest keeps working; the classifier's routes say what happened and where to look.
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
        assert chat(client, "tiny-chat")
        reply = client.post("/api/v1/classify", json={"text": "hello"})
        assert reply.status_code == 503 and "Retry-After" not in reply.headers
        assert reply.json()["state"] == "missing"
        assert str(job.log) in reply.json()["detail"] and "scratchgpt finetune spam" in reply.json()["detail"]


def test_the_pages_carry_the_status_line(client):
    for page in ("/", "/spam"):
        html = client.get(page).text
        assert 'id="job-status"' in html and "/static/js/jobs.js" in html


def test_a_job_that_stopped_reporting_is_shown_failed(make_settings, tmp_path):
    """A job killed with its runner (SIGKILL) writes no outcome: its silence is the report."""
    home = tmp_path / "home"
    (home / "jobs").mkdir(parents=True)
    (home / "jobs" / "spam-classifier.json").write_text(json.dumps({
        "state": "running", "fraction": 0.3, "eta_seconds": 100, "title": "spam classifier", "role": "classifier",
        "log": str(home / "jobs" / "spam-classifier.log"), "updated_at": time.time() - STALE_SECONDS - 5}))
    with running_client(make_settings(home=home)) as client:
        shown = wait_until(lambda: the_job(client, "spam-classifier"), "the job listed")
        assert shown["state"] == "failed" and "stopped before it finished" in shown["summary"]
        assert client.get("/api/v1/jobs").json()["active"] is False


@pytest.mark.parametrize("job, line", [
    ({"name": "x", "title": "spam classifier", "state": "queued"}, "spam classifier: queued behind the jobs before it"),
    ({"name": "x", "title": "instruction model", "state": "running", "fraction": 0.437, "eta_seconds": 370},
     "instruction model: training, 43%, about 6 min left"),
    ({"name": "x", "title": "spam classifier", "state": "running", "fraction": 0.5, "eta_seconds": 41},
     "spam classifier: training, 50%, about 50 s left"),
    ({"name": "x", "state": "running", "fraction": None, "message": "loading"}, "x: preparing (loading)"),
    ({"name": "x", "title": "t", "state": "failed", "message": "offline", "log": "/h/jobs/x.log"},
     "t: failed: offline (log: /h/jobs/x.log)"),
])
def test_summaries(job, line):
    assert summary(job) == line


def test_jobs_are_listed_in_the_order_they_run(tmp_path):
    from app.services.jobs import read_jobs

    for name, order in (("a-second", 1), ("b-first", 0), ("c-by-hand", None)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"state": "queued", "order": order}))
    (tmp_path / "d-half-written.json").write_text('{"state": "que')
    assert list(read_jobs(tmp_path)) == ["b-first", "a-second", "c-by-hand"]
