"""A pretraining process SIGKILLed in the middle of a checkpoint save (issue 6).

The job runs as a subprocess with the test hook SCRATCHGPT_TEST_PAUSE_IN_SAVE,
which makes it sleep inside the save of step 10, after the new weights and a
temporary state file are on disk and before the state file is renamed into
place. The test kills it there, then checks that the previous checkpoint
loads, that --resume continues from it, and that the resumed run ends exactly
where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from core.weights.checkpoint import load_checkpoint
from training.job_config import load_job_config
from training.pretrain import PretrainConfig, pretrain
from training.run_state import SAVE_PAUSE_ENV, STATE_FILE, list_checkpoints
from waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
WORDS = "the cat sat on a mat while dogs ran in the park and birds sang songs of morning light".split()
FLAGS = {
    "model": "gpt2-small", "emb_dim": 32, "n_layers": 2, "n_heads": 2, "context_length": 32, "drop_rate": 0.1,
    "batch_size": 4, "max_steps": 15, "lr": 1e-2, "warmup_steps": 2, "eval_interval": 5, "eval_batches": 2,
    "sample_interval": 0, "checkpoint_interval": 5, "keep_checkpoints": 2, "device": "cpu", "threads": 1,
}


def as_argv(flags: dict) -> list[str]:
    argv = []
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def test_killed_during_save_resumes_from_previous_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(0)
    data = tmp_path / "corpus.txt"
    data.write_text(" ".join(rng.choice(WORDS) for _ in range(2500)))
    run = tmp_path / "run"
    env = {**os.environ, SAVE_PAUSE_ENV: "10:120", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "training.pretrain", "--data", str(data), "--run-dir", str(run), "--no-progress", *as_argv(FLAGS)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pending_state = run / "checkpoints" / "step-000010" / (STATE_FILE + ".tmp")
    try:
        def saving() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode()
            return pending_state.exists()

        wait_until(saving, "the job reaching the save of step 10")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    # The half-written step 10 does not count; step 5 is complete and loads.
    assert [step for step, _ in list_checkpoints(run)] == [5]
    assert load_checkpoint(run / "checkpoints" / "step-000005").config.emb_dim == 32

    pretrain(load_job_config(PretrainConfig, None, {"resume": run, "progress": False}))
    assert [step for step, _ in list_checkpoints(run)] == [10, 15]
    assert not list((run / "checkpoints").glob(".*")) and not pending_state.exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, 16))  # steps 6-10 of the killed process were dropped, then redone

    # Same result as a run that was never interrupted (same thread count as the subprocess).
    threads = torch.get_num_threads()
    try:
        reference = pretrain(load_job_config(PretrainConfig, None, {**FLAGS, "data": [data], "run_dir": tmp_path / "ref", "progress": False}))
    finally:
        torch.set_num_threads(threads)
    a = load_file(str(run / "checkpoints" / "step-000015" / "model.safetensors"))
    b = load_file(str(reference / "checkpoints" / "step-000015" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
