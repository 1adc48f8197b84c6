"""`scratchgpt pretrain` on two nodes: two torchrun launchers meeting at a c10d rendezvous.

On a cluster each node runs one launcher (docs/pretraining.md, "Several machines"); here both run on
loopback, one process each, as two nodes would, with nothing shared between them but the
rendezvous endpoint and the run directory's file system. The result must be the single-process run
on the same global batch (tests/training/test_distributed.py checks the one-node case the same way).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_distributed import RUN_GUARD, TINY, final_weights, records, corpus  # noqa: F401 (corpus: a fixture)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # three jobs, four interpreters importing torch: about a minute here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1"}


def config_file(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def test_two_nodes_equal_one_process_on_the_same_global_batch(tmp_path, corpus):  # noqa: F811
    same = {**TINY, "data": [str(corpus)], "drop_rate": 0.0, "max_steps": 6, "eval_interval": 3,
            "checkpoint_interval": 6}
    two = config_file(tmp_path / "two.json", {**same, "run_dir": str(tmp_path / "two-nodes")})
    one = config_file(tmp_path / "one.json", {**same, "run_dir": str(tmp_path / "one-process"), "batch_size": 4})

    endpoint = f"127.0.0.1:{free_port()}"
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "multinode-test",
            "--local-addr", "127.0.0.1", "-m", "scratchgpt", "pretrain", "--config", str(two)]
    logs = [open(tmp_path / f"node{i}.log", "w") for i in (0, 1)]
    launchers = [subprocess.Popen(node, cwd=tmp_path, env=environment(), stdout=log, stderr=subprocess.STDOUT)
                 for log in logs]
    try:
        codes = [launcher.wait(RUN_GUARD) for launcher in launchers]
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
        for log in logs:
            log.close()
    assert codes == [0, 0], "\n".join((tmp_path / f"node{i}.log").read_text()[-3000:] for i in (0, 1))

    single = subprocess.run([sys.executable, "-m", "scratchgpt", "pretrain", "--config", str(one)], cwd=tmp_path,
                            env=environment(), capture_output=True, text=True, timeout=RUN_GUARD)
    assert single.returncode == 0, single.stderr[-3000:]

    nodes, alone = records(tmp_path / "two-nodes", "train"), records(tmp_path / "one-process", "train")
    assert [r["step"] for r in nodes] == list(range(1, 7))  # one writer over both nodes: no duplicated lines
    assert [r["loss"] for r in nodes] == pytest.approx([r["loss"] for r in alone], rel=1e-5)
    assert nodes[-1]["tokens"] == alone[-1]["tokens"]  # the same global batch: 2 nodes x 2 = 1 process x 4
    two_weights, one_weights = final_weights(tmp_path / "two-nodes"), final_weights(tmp_path / "one-process")
    assert two_weights.keys() == one_weights.keys()
    for name in one_weights:
        torch.testing.assert_close(two_weights[name], one_weights[name], rtol=1e-4, atol=1e-5)
