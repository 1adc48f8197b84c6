"""training.progress: a job's status file, as `scratchgpt serve`'s runner and the service read it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.finetune_instruct import InstructConfig, finetune_instruct
from training.finetune_spam import SpamConfig, finetune_spam
from training.progress import JobProgress, read_status, write_status

REPO = Path(__file__).resolve().parents[2]


def test_writes_merge_into_what_the_runner_wrote(tmp_path):
    path = tmp_path / "jobs" / "x.json"
    write_status(path, state="queued", title="spam classifier", log="/h/jobs/x.log")
    progress = JobProgress(path, title="spam classifier", role="classifier", checkpoint=tmp_path / "out")
    status = read_status(path)
    assert status["state"] == "running" and status["log"] == "/h/jobs/x.log" and status["fraction"] is None
    assert status["checkpoint"] == str(tmp_path / "out") and status["role"] == "classifier"

    progress.step(1, 4, "epoch 1/1, step 1/4")
    status = read_status(path)
    assert status["fraction"] == 0.25 and status["eta_seconds"] is None  # one step: no rate yet
    progress.step(4, 4, "epoch 1/1, step 4/4")  # the last step is always written
    status = read_status(path)
    assert status["fraction"] == 1.0 and status["eta_seconds"] == 0 and status["message"] == "epoch 1/1, step 4/4"

    progress.done(tmp_path / "out")
    progress.step(2, 4, "late")  # nothing after the end
    assert read_status(path)["state"] == "done" and read_status(path)["message"] == "done"
    assert not list(path.parent.glob(".*.tmp"))  # every write replaced the file whole


def test_without_a_path_nothing_is_written(tmp_path):
    progress = JobProgress(None, title="t", role="chat")
    progress.stage("x")
    progress.step(1, 2, "y")
    progress.done(tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_bad_state_is_refused(tmp_path):
    with pytest.raises(ValueError, match="queued, running, done, failed"):
        write_status(tmp_path / "x.json", state="finished")


def test_a_job_that_exits_without_finishing_is_reported_failed(tmp_path):
    path = tmp_path / "x.json"
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from training.progress import JobProgress; "
            f"JobProgress({str(path)!r}, title='t', role='chat'); raise ValueError('bad data')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 1
    status = read_status(path)
    assert status["state"] == "failed" and "stopped before it finished" in status["message"]


def write_spam(path: Path) -> Path:
    lines = [f"ham\tsee you at lunch {i}" for i in range(24)] + [f"spam\tWIN a FREE prize now {i}" for i in range(16)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_spam_job_reports_its_steps_and_its_checkpoint(tmp_path, tiny_base):
    status_file = tmp_path / "jobs" / "spam.json"
    out = finetune_spam(SpamConfig(base=str(tiny_base), data=write_spam(tmp_path / "sms"), out=tmp_path / "spam",
                                   epochs=2, device="cpu", progress_file=status_file))
    status = json.loads(status_file.read_text())
    assert status["state"] == "done" and status["checkpoint"] == str(out) and status["fraction"] == 1.0
    assert status["role"] == "classifier" and status["title"] == "spam classifier"


def test_the_instruction_job_reports_its_steps_and_its_checkpoint(tmp_path, tiny_base):
    data = tmp_path / "instruct.json"
    data.write_text(json.dumps([{"instruction": f"Say {w}.", "input": "", "output": w}
                                for w in "red blue green cat dog sun moon tree rain snow".split()]))
    status_file = tmp_path / "jobs" / "chat.json"
    out = finetune_instruct(InstructConfig(base=str(tiny_base), data=data, out=tmp_path / "chat", epochs=1,
                                           batch_size=4, test_responses=False, device="cpu", progress_file=status_file))
    status = json.loads(status_file.read_text())
    assert status["state"] == "done" and status["checkpoint"] == str(out) and status["fraction"] == 1.0
    assert status["role"] == "chat" and status["title"] == "instruction model"
