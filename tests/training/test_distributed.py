"""Pretraining under torchrun: 2 CPU processes (gloo) on a tiny model.

Each rank runs the real Trainer and writes a hash of its final weights; DDP
must leave both ranks with identical weights, the loss must fall, and only
rank 0 may write to the run directory.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORDS = "the cat sat on a mat while dogs ran in the park and birds sang songs of morning light".split()

RANK_SCRIPT = """
import hashlib, json, sys
from pathlib import Path
from training import distributed
from training.job_config import load_job_config
from training.pretrain import PretrainConfig, Trainer

cfg = load_job_config(PretrainConfig, None, json.loads(sys.argv[1]))
env = distributed.setup(cfg.device)
trainer = Trainer(cfg, env)
trainer.run()
digest = hashlib.sha256()
for name, tensor in sorted(trainer.model.state_dict().items()):
    digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
Path(sys.argv[2], f"rank{env.rank}.sha256").write_text(json.dumps({"world": env.world_size, "sha": digest.hexdigest()}))
distributed.teardown(env)
"""


def test_two_cpu_ranks_stay_identical_and_learn(tmp_path: Path) -> None:
    rng = random.Random(0)
    data = tmp_path / "corpus.txt"
    data.write_text(" ".join(rng.choice(WORDS) for _ in range(2500)))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    run = tmp_path / "run"
    cfg = {
        "data": [str(data)], "run_dir": str(run), "model": "gpt2-small", "emb_dim": 32, "n_layers": 2, "n_heads": 2,
        "context_length": 32, "drop_rate": 0.1, "batch_size": 2, "grad_accum": 2, "max_steps": 12, "lr": 1e-2,
        "warmup_steps": 2, "eval_interval": 6, "eval_batches": 2, "sample_interval": 0, "checkpoint_interval": 6,
        "progress": False, "device": "cpu",
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), json.dumps(cfg), str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    hashes = [json.loads((tmp_path / f"rank{r}.sha256").read_text()) for r in (0, 1)]
    assert hashes[0]["world"] == hashes[1]["world"] == 2
    assert hashes[0]["sha"] == hashes[1]["sha"]

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))  # one writer: no duplicated lines
    assert train[0]["tokens"] == 2 * 2 * 2 * 32  # batch x accumulation x ranks x context
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 2.0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000006", "step-000012"]
