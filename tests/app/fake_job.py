"""A stand-in for ``scratchgpt finetune spam|instruct`` in tests/app/test_jobs.py, run as a child
process by ``scratchgpt.serve.JobRunner`` exactly as the real jobs are.

It reports through ``training.progress`` as they do, stops half way until the test creates the
``--gate`` file (so the test sees the progress without racing it), then either writes a tiny
checkpoint of the kind the role needs, as ``tests/app/conftest.py`` makes them, or fails the way the
CLI does (a last line saying why, exit status 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this tree's training, whatever is installed
from training.progress import MIN_WRITE_SECONDS, JobProgress  # noqa: E402

HANG_GUARD = 120.0


def tiny_checkpoint(out: Path, role: str) -> None:
    from core.classifier import SequenceClassifier
    from core.generation.chat_template import ALPACA
    from core.model import GPTModel
    from core.model.config import ModelConfig
    from core.tokenizer.gpt2 import gpt2_tokenizer
    from core.weights.checkpoint import save_checkpoint

    torch.manual_seed(7)
    model = GPTModel(ModelConfig(context_length=256, vocab_size=50257, emb_dim=32, n_layers=2, n_heads=2))
    if role == "classifier":
        save_checkpoint(out, SequenceClassifier(model, num_classes=2), gpt2_tokenizer(), task="classification",
                        labels=["ham", "spam"], metadata={"name": out.name})
    else:
        save_checkpoint(out, model, gpt2_tokenizer(), chat_template=ALPACA, metadata={"name": out.name})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--progress-file", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--role", choices=["chat", "classifier"], required=True)
    parser.add_argument("--title", required=True)
    parser.add_argument("--gate", type=Path, required=True)
    parser.add_argument("--fail", default=None, help="fail at the gate with this reason")
    args = parser.parse_args()

    progress = JobProgress(args.progress_file, title=args.title, role=args.role, checkpoint=args.out)
    progress.stage("loading the base model")
    progress.step(1, 4, "epoch 1/2, step 1/4")
    time.sleep(MIN_WRITE_SECONDS)  # a step's work: the next report is not thrown away as too soon
    progress.step(2, 4, "epoch 1/2, step 2/4")
    deadline = time.monotonic() + HANG_GUARD
    while not args.gate.exists():
        if time.monotonic() > deadline:
            print("fake job: the test never opened the gate", file=sys.stderr)
            return 3
        time.sleep(0.02)
    if args.fail:
        print(f"scratchgpt finetune: error: {args.fail}", file=sys.stderr)
        return 2
    tiny_checkpoint(args.out, args.role)
    progress.step(4, 4, "epoch 2/2, step 4/4")
    progress.done(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
