"""`scratchgpt serve`'s offline jobs: which fine-tunes a home lacks, and the real jobs run by the
JobRunner as child processes, reporting through their status files (the service's side of it is
tests/app/test_jobs.py)."""

from __future__ import annotations

import json
import sys

import pytest

from core.model import GPTModel
from core.model.config import ModelConfig
from core.tokenizer.gpt2 import gpt2_tokenizer
from core.weights.checkpoint import load_checkpoint, save_checkpoint
from scratchgpt import serve
from scratchgpt.cli import main


def test_the_missing_fine_tunes_are_planned_in_order_with_their_status_files(tmp_path, tiny_base):
    home, spam, instruct = tmp_path / "home", tmp_path / "sms.txt", tmp_path / "instruct.json"
    jobs = serve.missing_jobs(home, tiny_base, spam_data=spam, instruct_data=instruct)
    assert [(j.name, j.role, j.title) for j in jobs] == [
        ("spam-classifier", "classifier", "spam classifier"), ("smollm2-135m-chat", "chat", "instruction model")]
    spam_job, chat_job = jobs
    assert spam_job.argv[:5] == [sys.executable, "-m", "scratchgpt", "finetune", "spam"]
    assert spam_job.argv[5:] == ["--base", str(tiny_base), "--out", str(home / "models" / "spam-classifier"),
                                 "--progress-file", str(home / "jobs" / "spam-classifier.json"), "--data", str(spam)]
    assert chat_job.argv[4] == "instruct" and chat_job.argv[-3:] == ["--data", str(instruct), "--no-test-responses"]
    assert chat_job.checkpoint == home / "models" / "smollm2-135m-chat"
    assert chat_job.log == home / "jobs" / "smollm2-135m-chat.log"

    # A checkpoint that exists is not made again; a role the user chose a checkpoint for is not trained.
    save_checkpoint(home / "models" / "spam-classifier", GPTModel(ModelConfig(
        vocab_size=50257, context_length=8, emb_dim=8, n_layers=1, n_heads=1)), gpt2_tokenizer())
    assert [j.name for j in serve.missing_jobs(home, tiny_base)] == ["smollm2-135m-chat"]
    assert serve.missing_jobs(home, tiny_base, chat=False) == []


def test_without_a_local_copy_the_jobs_download_the_published_data(tmp_path, tiny_base, monkeypatch):
    monkeypatch.setattr(serve, "SHARED_SPAM", tmp_path / "none")
    monkeypatch.setattr(serve, "SHARED_INSTRUCT", tmp_path / "none")
    for job in serve.missing_jobs(tmp_path / "home", tiny_base):
        assert "--data" not in job.argv  # the job fetches it through core.weights.fetch


@pytest.mark.parametrize("flag", ["--instruct-data", "--spam-data"])
def test_serve_refuses_a_data_file_that_is_not_there(tmp_path, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", flag, str(tmp_path / "nope.json")])
    assert exit_.value.code == 2
    assert f"{flag} {tmp_path / 'nope.json'}: no such file" in capsys.readouterr().err


HAM = ["see you at lunch", "ok call me later", "are we still on for dinner", "i am running late sorry"]
SPAM = ["WINNER! claim your FREE prize now, txt WIN to 80086", "URGENT! you have won a cash award, call 0906"]


@pytest.mark.slow  # two child processes, each importing torch
def test_the_runner_runs_the_real_jobs_one_after_the_other(tmp_path, tiny_base):
    spam = tmp_path / "sms.txt"
    spam.write_text("".join(f"ham\t{HAM[i % 4]} {i}\n" for i in range(24)) +
                    "".join(f"spam\t{SPAM[i % 2]} {i}\n" for i in range(16)), encoding="utf-8")
    instruct = tmp_path / "instruct.json"
    instruct.write_text(json.dumps([{"instruction": f"Repeat {w}.", "input": "", "output": w}
                                    for w in "red blue green cat dog sun moon tree rain snow fish bird".split()]))
    home = tmp_path / "home"
    jobs = serve.missing_jobs(home, tiny_base, spam_data=spam, instruct_data=instruct)
    for job in jobs:  # the job defaults, shortened for a test
        job.argv += ["--epochs", "1", "--device", "cpu"] + (["--max-length", "64"] if job.role == "chat" else [])
    runner = serve.JobRunner(jobs).start()
    assert runner.wait(300)
    for job in jobs:
        status = json.loads(job.status.read_text())
        assert status["state"] == "done", job.log.read_text()[-2000:]
        assert status["fraction"] == 1.0 and status["eta_seconds"] == 0 and status["checkpoint"] == str(job.checkpoint)
        assert status["role"] == job.role and status["title"] == job.title and status["log"] == str(job.log)
        assert job.log.stat().st_size > 0
    assert load_checkpoint(jobs[0].checkpoint).task == "classification"
    assert load_checkpoint(jobs[1].checkpoint).task == "causal-lm"


def test_a_job_that_cannot_get_its_data_fails_with_what_to_do(tmp_path, tiny_base):
    """The last line of the job's output is the reason; a download that failed adds which flag gives the file."""
    home = tmp_path / "home"
    job = serve.missing_jobs(home, tiny_base, classifier=False)[0]
    job.argv = [sys.executable, "-c", "import sys; print('could not download instruction-data.json: offline', "
                "file=sys.stderr); sys.exit(2)"]
    runner = serve.JobRunner([job]).start()
    assert runner.wait(60)
    status = json.loads(job.status.read_text())
    assert status["state"] == "failed" and status["log"] == str(job.log)
    assert status["message"] == ("could not download instruction-data.json: offline; give the book's "
                                 "instruction-data.json with `scratchgpt serve --instruct-data FILE`")
