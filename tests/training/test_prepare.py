"""training.prepare: text into memory-mapped token files, and pretraining from them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from core.data import DataError, TokenFile
from core.tokenizer.gpt2 import gpt2_tokenizer
from training.job_config import load_job_config
from training.prepare import PrepareConfig, prepare
from training.pretrain import PretrainConfig, pretrain

WORDS = "the cat sat on a mat while dogs ran in the park and birds sang songs of morning light".split()


@pytest.fixture(autouse=True)
def restore_threads():
    """Jobs here run with threads=1 (tiny models gain nothing from more); give pytest its setting back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write_docs(folder: Path, n: int = 2) -> list[Path]:
    folder.mkdir()
    rng = random.Random(1)
    paths = []
    for i in range(n):
        p = folder / f"doc{i}.txt"
        p.write_text(" ".join(rng.choice(WORDS) for _ in range(1500)))
        paths.append(p)
    return paths


def test_prepare_writes_the_book_split(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "texts")
    summary = prepare(PrepareConfig(inputs=[tmp_path / "texts"], out_dir=tmp_path / "out", val_fraction=0.1))
    train, val = TokenFile(tmp_path / "out" / "train.bin"), TokenFile(tmp_path / "out" / "val.bin")
    assert (summary["train_tokens"], summary["val_tokens"]) == (len(train), len(val))
    assert train.header["tokenizer"] == "gpt2" and train.header["split"] == "train"
    # Same ids as tokenizing each document's first 90% and joining with <|endoftext|>.
    tok = gpt2_tokenizer("tiktoken")
    texts = [p.read_text() for p in docs]
    heads = [t[: int(0.9 * len(t))] for t in texts]
    expected = tok.encode(heads[0]) + [tok.eos_id] + tok.encode(heads[1])
    assert np.array_equal(np.asarray(train.ids, dtype=np.int64), expected)
    assert tok.decode(val.ids.tolist()).startswith(texts[0][int(0.9 * len(texts[0])) :])


def test_pretrain_reads_prepared_dir(tmp_path: Path) -> None:
    write_docs(tmp_path / "texts")
    prepare(PrepareConfig(inputs=[tmp_path / "texts"], out_dir=tmp_path / "out"))
    cfg = load_job_config(PretrainConfig, None, dict(
        data=[tmp_path / "out"], run_dir=tmp_path / "run", emb_dim=32, n_layers=2, n_heads=2, context_length=32,
        batch_size=4, max_steps=6, lr=1e-2, eval_interval=3, eval_batches=2, sample_interval=0, progress=False, device="cpu", threads=1,
    ))
    run = pretrain(cfg)
    run_json = json.loads((run / "run.json").read_text())
    assert "token files" in run_json["data"]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_prepare_refuses_to_overwrite_and_empty_input(tmp_path: Path) -> None:
    write_docs(tmp_path / "texts")
    prepare(PrepareConfig(inputs=[tmp_path / "texts"], out_dir=tmp_path / "out"))
    before = (tmp_path / "out" / "train.bin").read_bytes()
    with pytest.raises(DataError, match="--overwrite"):
        prepare(PrepareConfig(inputs=[tmp_path / "texts"], out_dir=tmp_path / "out"))
    assert (tmp_path / "out" / "train.bin").read_bytes() == before
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        prepare(PrepareConfig(inputs=[tmp_path / "blank.txt"], out_dir=tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()
    with pytest.raises(DataError, match="matches no file"):
        prepare(PrepareConfig(inputs=[tmp_path / "nothing-*.txt"], out_dir=tmp_path / "out3"))
