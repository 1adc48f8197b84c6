"""``scratchgpt prepare``: tokenize text once into memory-mapped token files.

Pretraining on a corpus larger than memory (or simply tokenizing it once
instead of at every run) uses the format of ``core.data.write_token_file``:
raw uint16 ids plus a JSON header. The split follows the book's chapter 5:
the first ``1 - val_fraction`` of each document's characters go to
``train.bin``, the rest to ``val.bin``; documents are joined with the
end-of-text token.

    OUT/train.bin, OUT/train.bin.json, OUT/val.bin, OUT/val.bin.json

``scratchgpt pretrain --data OUT`` then trains on it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.data import DataError, write_token_file
from training.pretrain_data import encode_documents, expand_inputs, is_token_file, read_text, split_text


@dataclass
class PrepareConfig:
    inputs: list[Path] = field(default_factory=list, metadata={"help": "text files, directories of .txt files, or globs"})
    out_dir: Path = field(default=Path("data/prepared"), metadata={"help": "directory for train.bin, val.bin and their .json headers"})
    tokenizer: str = field(default="gpt2", metadata={"help": "tokenizer to encode with", "choices": ("gpt2",)})
    val_fraction: float = field(default=0.1, metadata={"help": "fraction of each document (its end) written to val.bin"})
    overwrite: bool = field(default=False, metadata={"help": "replace token files already in --out-dir"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Write the token files; returns (and prints as JSON) what was written."""
    from core.tokenizer.gpt2 import gpt2_tokenizer

    if not cfg.inputs:
        raise DataError("give at least one input text file (or directory, or glob)")
    files = expand_inputs(cfg.inputs, "inputs")
    if any(p.is_dir() or is_token_file(p) for p in files):
        raise DataError("prepare reads text files; an input is already a token file or a prepared directory")
    out = Path(cfg.out_dir)
    targets = [out / "train.bin", out / "val.bin"]
    existing = [p for p in targets if p.exists()]
    if existing and not cfg.overwrite:
        raise DataError(f"{existing[0]} already exists; pass --overwrite to replace it or choose another --out-dir")
    tokenizer = gpt2_tokenizer("tiktoken")
    texts = [read_text(p) for p in files]  # fails on an empty file before anything is written
    pairs = [split_text(t, cfg.val_fraction) for t in texts]
    train = encode_documents([a for a, _ in pairs], tokenizer)
    val = encode_documents([b for _, b in pairs if b], tokenizer)
    header = {"tokenizer": cfg.tokenizer, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
              "documents": [str(p) for p in files], "val_fraction": cfg.val_fraction}
    write_token_file(out / "train.bin", train, {**header, "split": "train"})
    write_token_file(out / "val.bin", val, {**header, "split": "val"})
    summary = {
        "out_dir": str(out), "tokenizer": cfg.tokenizer, "documents": len(files),
        "characters": sum(len(t) for t in texts), "train_tokens": int(train.size), "val_tokens": int(val.size),
    }
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    from training.job_config import run_job_main

    return run_job_main(PrepareConfig, prepare, argv, "python -m training.prepare", __doc__)


if __name__ == "__main__":
    sys.exit(main())
