"""Pretraining under torchrun: 2 CPU processes (gloo) on a tiny model.

Each process runs the real Trainer and reports a hash of its final weights and the tokens it fed
the model in training steps, counted by a hook on the model's forward (not computed from the
config). DDP must leave both ranks with identical weights, the loss must fall, and only rank 0
may write to the run directory; 2 ranks must train as one process does on the same global batch;
and a 2-rank run stopped and resumed must continue exactly, each rank with its own RNG.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
WORDS = "the cat sat on a mat while dogs ran in the park and birds sang songs of morning light".split()
RUN_GUARD = 600  # seconds: only a hung job waits this long (two interpreters importing torch, then milliseconds a step)

PROCESS_SCRIPT = """
import hashlib, json, sys
from pathlib import Path
from training import distributed
from training.job_config import load_job_config
from training.pretrain import PretrainConfig, Trainer

cfg = load_job_config(PretrainConfig, None, json.loads(sys.argv[1]))
env = distributed.setup(cfg.device)
trainer = Trainer(cfg, env)
seen = [0]  # tokens fed to the model in training mode: evaluation and samples run in eval mode


def count(module, args):
    if module.training:
        seen[0] += args[0].numel()


trainer.model.register_forward_pre_hook(count)
trainer.run()
digest = hashlib.sha256()
for name, tensor in sorted(trainer.model.state_dict().items()):
    digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
report = {"world": env.world_size, "sha": digest.hexdigest(), "tokens": seen[0]}
Path(sys.argv[2], f"rank{env.rank}.json").write_text(json.dumps(report))
distributed.teardown(env)
"""

TINY = {
    "model": "gpt2-small", "emb_dim": 32, "n_layers": 2, "n_heads": 2, "context_length": 32, "drop_rate": 0.1,
    "batch_size": 2, "grad_accum": 2, "max_steps": 12, "lr": 1e-2, "warmup_steps": 2, "eval_interval": 6,
    "eval_batches": 2, "sample_interval": 0, "checkpoint_interval": 6, "progress": False, "device": "cpu", "threads": 1,
}


def run_job(out: Path, cfg: dict, processes: int) -> list[dict]:
    """The job in ``processes`` processes (torchrun when more than one); each process's report, by rank."""
    out.mkdir(parents=True)
    script = out / "job.py"
    script.write_text(PROCESS_SCRIPT)
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *launch, str(script), json.dumps(cfg), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=RUN_GUARD)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    data = tmp_path_factory.mktemp("data") / "corpus.txt"
    data.write_text(" ".join(rng.choice(WORDS) for _ in range(2500)))
    return data


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, corpus) -> tuple[Path, list[dict]]:
    """12 steps on 2 ranks, with dropout (so each rank's RNG matters), uninterrupted."""
    out = tmp_path_factory.mktemp("ddp")
    run = out / "run"
    return run, run_job(out / "reports", {**TINY, "data": [str(corpus)], "run_dir": str(run)}, 2)


def test_two_cpu_ranks_stay_identical_and_learn(two_ranks) -> None:
    run, reports = two_ranks
    assert [r["world"] for r in reports] == [2, 2]
    assert reports[0]["sha"] == reports[1]["sha"]

    train = records(run, "train")
    assert [r["step"] for r in train] == list(range(1, 13))  # one writer: no duplicated lines
    # The logged token count is what the two processes fed the model, half each.
    assert reports[0]["tokens"] == reports[1]["tokens"] > 0
    assert train[-1]["tokens"] == reports[0]["tokens"] + reports[1]["tokens"]
    evals = records(run, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 2.0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000006", "step-000012"]


@pytest.mark.slow  # two more jobs: about 50 s here
def test_two_ranks_equal_one_process_on_the_same_global_batch(tmp_path, corpus) -> None:
    """Rank r of 2 takes windows r, r+2, ... of each epoch's order, so 2 ranks with batches of 2
    see, each step, exactly the windows one process sees with batches of 4; DDP's averaged
    gradients then equal that process's, and so do the losses and weights (within float rounding:
    the sums are taken in another order). No dropout: its masks would differ."""
    same = {**TINY, "data": [str(corpus)], "drop_rate": 0.0}
    ddp = run_job(tmp_path / "ddp", {**same, "run_dir": str(tmp_path / "ddp-run")}, 2)
    one = run_job(tmp_path / "one", {**same, "run_dir": str(tmp_path / "one-run"), "batch_size": 4}, 1)
    ddp_train, one_train = records(tmp_path / "ddp-run", "train"), records(tmp_path / "one-run", "train")
    assert [r["loss"] for r in ddp_train] == pytest.approx([r["loss"] for r in one_train], rel=1e-5)
    ddp_weights, one_weights = final_weights(tmp_path / "ddp-run"), final_weights(tmp_path / "one-run")
    assert ddp_weights.keys() == one_weights.keys()
    for name in ddp_weights:
        torch.testing.assert_close(ddp_weights[name], one_weights[name], rtol=1e-4, atol=1e-5)
    measured = sum(r["tokens"] for r in ddp)
    assert measured == one[0]["tokens"] == ddp_train[-1]["tokens"] == one_train[-1]["tokens"]


@pytest.mark.slow  # two more 2-rank jobs: about 35 s here
def test_a_stopped_two_rank_run_resumes_exactly(tmp_path, corpus, two_ranks) -> None:
    """6 steps, stop, resume for 6 more on 2 ranks == 12 in one go: the same losses, bit-identical
    weights on both ranks. With dropout on, that needs each rank's own RNG back."""
    whole, whole_reports = two_ranks
    split = tmp_path / "split"
    first = run_job(tmp_path / "first", {**TINY, "data": [str(corpus)], "run_dir": str(split), "stop_at_step": 6}, 2)
    assert [r["step"] for r in records(split, "train")] == list(range(1, 7))
    second = run_job(tmp_path / "second", {"resume": str(split), "progress": False, "device": "cpu", "threads": 1}, 2)
    assert [r["loss"] for r in records(split, "train")] == [r["loss"] for r in records(whole, "train")]
    split_weights, whole_weights = final_weights(split), final_weights(whole)
    assert split_weights.keys() == whole_weights.keys()
    for name in whole_weights:
        assert torch.equal(split_weights[name], whole_weights[name]), name
    assert [r["sha"] for r in second] == [r["sha"] for r in whole_reports]
    for rank in (0, 1):
        assert first[rank]["tokens"] + second[rank]["tokens"] == whole_reports[rank]["tokens"]
