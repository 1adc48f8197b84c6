"""training.pretrain on a tiny model: outputs, exact resume, accumulation, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.weights.checkpoint import load_checkpoint
from core.data import DataError
from training.job_config import JobConfigError, load_job_config
from training.pretrain import PretrainConfig, pretrain
from training.run_state import STATE_FILE, RunDirError, load_state

WORDS = "the cat sat on a mat while dogs ran in the park and birds sang songs of morning light".split()


@pytest.fixture(autouse=True)
def restore_threads():
    """Jobs here run with threads=1 (tiny models gain nothing from more); give pytest its setting back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write_corpus(path: Path, n_words: int = 2500, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(n_words)), encoding="utf-8")
    return path


def tiny(data: Path, run_dir: Path, **overrides) -> PretrainConfig:
    """A d=32, 2-layer, context-32 model: a step takes milliseconds."""
    base = dict(
        data=[data], run_dir=run_dir, model="gpt2-small", emb_dim=32, n_layers=2, n_heads=2, context_length=32,
        drop_rate=0.1, batch_size=4, max_steps=20, lr=1e-2, warmup_steps=2, eval_interval=5, eval_batches=2,
        sample_interval=0, checkpoint_interval=10, keep_checkpoints=2, progress=False, device="cpu", threads=1,
    )
    base.update(overrides)
    return load_job_config(PretrainConfig, None, base)


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(str(last / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_run_writes_checkpoints_metrics_and_plot(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "corpus.txt")
    run = pretrain(tiny(data, tmp_path / "run", sample_interval=10, sample_tokens=4))
    losses = train_losses(run)
    assert len(losses) == 20 and losses[-1] < losses[0] - 2.0  # a learnable corpus: the loss falls
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 5, 10, 15, 20]
    assert evals[-1]["val_ppl"] == pytest.approx(torch.tensor(evals[-1]["val_loss"]).exp().item(), rel=1e-6)
    samples = [r for r in records if r["kind"] == "sample"]
    assert [r["step"] for r in samples] == [10, 20] and samples[0]["text"].startswith("Every effort moves you")
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # keep_checkpoints=2 leaves the last two; each loads with core and its state with weights_only.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000010", "step-000020"]
    ckpt = load_checkpoint(run / "checkpoints" / "step-000020")
    assert ckpt.config.emb_dim == 32 and ckpt.metadata["step"] == 20
    state = load_state(run / "checkpoints" / "step-000020" / STATE_FILE)
    assert state["step"] == 20 and state["sampler"]["pos"] > 0


def test_resume_is_exact(tmp_path: Path) -> None:
    """20 steps in one go == 10 steps, stop, resume, 10 steps: same losses, bit-identical weights."""
    data = write_corpus(tmp_path / "corpus.txt")
    whole = pretrain(tiny(data, tmp_path / "whole"))
    split = pretrain(tiny(data, tmp_path / "split", stop_at_step=10))
    assert len(train_losses(split)) == 10
    # Only --resume (and the stop step) is given: the run's own settings are used.
    pretrain(load_job_config(PretrainConfig, None, {"resume": split, "progress": False}))
    assert train_losses(split) == train_losses(whole)
    assert_same_weights(final_weights(split), final_weights(whole))


def test_gradient_accumulation_matches_a_larger_batch(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "corpus.txt")
    big = pretrain(tiny(data, tmp_path / "big", batch_size=4, grad_accum=1, drop_rate=0.0, max_steps=5))
    acc = pretrain(tiny(data, tmp_path / "acc", batch_size=2, grad_accum=2, drop_rate=0.0, max_steps=5))
    assert train_losses(acc) == pytest.approx(train_losses(big), rel=1e-4)
    a, b = final_weights(big), final_weights(acc)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_trains(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "corpus.txt")
    run = pretrain(tiny(data, tmp_path / "run", precision="bf16", max_steps=8, eval_interval=0))
    losses = train_losses(run)
    assert losses[-1] < losses[0] - 1.0
    assert final_weights(run)["tok_emb.weight"].dtype == torch.float32  # master weights stay fp32


# -- bad input: a clear error, nothing written -------------------------------------


def test_empty_data_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        pretrain(tiny(empty, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_data_shorter_than_one_window(tmp_path: Path) -> None:
    short = write_corpus(tmp_path / "short.txt", n_words=20)
    with pytest.raises(DataError, match="fewer than one window of --context-length 32"):
        pretrain(tiny(short, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unknown_config_key(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("lr: 0.001\nlearning_rate: 0.1\n")
    with pytest.raises(JobConfigError, match="learning_rate") as info:
        load_job_config(PretrainConfig, config, {})
    assert str(config) in str(info.value)


def test_resume_from_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("precious")
    with pytest.raises(RunDirError, match="not a pretraining run"):
        pretrain(load_job_config(PretrainConfig, None, {"resume": stranger}))
    with pytest.raises(RunDirError, match="no such directory"):
        pretrain(load_job_config(PretrainConfig, None, {"resume": tmp_path / "missing"}))
    assert [p.name for p in stranger.iterdir()] == ["keep.txt"] and (stranger / "keep.txt").read_text() == "precious"


def test_resume_a_run_without_a_complete_checkpoint(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "corpus.txt")
    run = pretrain(tiny(data, tmp_path / "run", max_steps=2))
    (run / "checkpoints" / "step-000002" / STATE_FILE).unlink()  # as if killed before the state was written
    with pytest.raises(RunDirError, match="no complete checkpoint"):
        pretrain(load_job_config(PretrainConfig, None, {"resume": run}))
    assert (run / "checkpoints" / "step-000002" / "model.safetensors").is_file()


def test_existing_run_dir_is_not_overwritten(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "corpus.txt")
    run = pretrain(tiny(data, tmp_path / "run", max_steps=2))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunDirError, match="already exists"):
        pretrain(tiny(data, run, max_steps=2))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_bad_numbers_are_rejected() -> None:
    with pytest.raises(JobConfigError, match="--batch-size"):
        load_job_config(PretrainConfig, None, {"batch_size": 0})
    with pytest.raises(JobConfigError, match="--val-fraction"):
        load_job_config(PretrainConfig, None, {"val_fraction": 1.5})
    with pytest.raises(JobConfigError, match="precision"):
        load_job_config(PretrainConfig, None, {"precision": "fp8"})


def test_torch_default_init_matches_the_books_model() -> None:
    """--init torch: N(0, 1) embeddings and Kaiming-uniform linears, as the book's GPTModel gets."""
    from core.model.config import ModelConfig
    from core.model import GPTModel
    from training.pretrain import reset_to_torch_defaults

    cfg = ModelConfig.from_preset("gpt2-small", emb_dim=64, n_layers=2, n_heads=2, context_length=32, tie_embeddings=False)
    model = GPTModel(cfg)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    reset_to_torch_defaults(model)
    assert model.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.05)
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    w = model.blocks[0].ff.fc.weight
    assert w.abs().max().item() <= bound and w.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)


def test_sinusoidal_positions_train_end_to_end(tmp_path: Path) -> None:
    """--pos-encoding sinusoidal: the fixed table of Vaswani et al. (2017) instead of a learned one; the loss falls."""
    from core.model.layers import sinusoidal_table

    data = write_corpus(tmp_path / "corpus.txt")
    run = pretrain(tiny(data, tmp_path / "run", pos_encoding="sinusoidal"))
    losses = train_losses(run)
    assert len(losses) == 20 and losses[-1] < losses[0] - 2.0
    ckpt = load_checkpoint(run / "checkpoints" / "step-000020")
    assert ckpt.config.pos_encoding == "sinusoidal"
    # The table is a buffer: twenty optimizer steps leave it as the formula made it.
    assert torch.equal(final_weights(run)["pos_emb.weight"], sinusoidal_table(32, 32))
    with pytest.raises(JobConfigError, match="not available for the gpt2 family"):
        pretrain(tiny(data, tmp_path / "bad", pos_encoding="rotary"))
    with pytest.raises(JobConfigError, match="--pos-encoding: .absolute. is not one of learned, sinusoidal, rotary"):
        tiny(data, tmp_path / "bad", pos_encoding="absolute")
