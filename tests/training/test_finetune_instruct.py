"""The instruction fine-tune on a tiny GPT-2-family model: full, LoRA, the prefix cache, evaluation."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.generation.chat_template import ALPACA
from core.generation.sampling import SamplingConfig
from core.weights.checkpoint import load_checkpoint, save_checkpoint
from core.model.config import ModelConfig
from core.model import GPTModel
from core.tokenizer.gpt2 import gpt2_tokenizer
from training.base_model import BaseModelError
from training.evaluate_instruct import evaluate_instruct
from core.weights.catalogue import GENERATION_KEYS
from training.evaluate_instruct import measure_instruct
from training.finetune_instruct import GENERATION_DEFAULTS, InstructConfig, LMBatches, finetune_instruct
from training.instruct_measure import read_dialogues
from training.instruct_data import InstructDataError, encode_example, read_instruct_file
from training.loss import lm_loss

ENTRIES = [
    {"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w}"}
    for w in ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rain", "snow", "fish", "bird",
              "car", "road", "milk", "bread", "salt", "gold", "iron", "wind"]
] + [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]


def tiny_model(family: str = "gpt2") -> GPTModel:
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=50257, context_length=128, emb_dim=16, n_layers=3, n_heads=2,
                      hidden_dim=32, qkv_bias=family == "gpt2")
    return GPTModel(cfg)


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "instruction-data.json"
    path.write_text(json.dumps(ENTRIES))
    return path


@pytest.fixture
def base(tmp_path) -> Path:
    return save_checkpoint(tmp_path / "base", tiny_model(), gpt2_tokenizer())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_prefix_gives_the_same_loss(family, data):
    model = tiny_model(family).eval()
    tok = gpt2_tokenizer()
    encoded = [encode_example(e.messages, ALPACA, tok) for e in read_instruct_file(data, ALPACA)[:6]]
    cfg = InstructConfig(batch_size=3, max_length=40, mask_prompt=True)
    plain = [b for b in LMBatches(model, encoded, cfg, tok.eos_id, None)]
    cached = LMBatches(model, encoded, cfg, tok.eos_id, 2)
    for (inputs, targets, _), batch in zip(plain, cached):
        assert batch[2].shape[:2] == inputs.shape
        torch.testing.assert_close(cached.loss(model, batch), lm_loss(model, inputs, targets), rtol=1e-5, atol=1e-6)


def test_full_finetune_writes_checkpoint_plot_and_responses(tmp_path, base, data):
    out = finetune_instruct(InstructConfig(base=str(base), data=data, out=tmp_path / "full", method="full",
                                           trainable_blocks=0, epochs=2, batch_size=4, lr=1e-3, eval_every=2,
                                           max_new_tokens=4, device="cpu"))
    ckpt = load_checkpoint(out)
    assert ckpt.task == "causal-lm" and ckpt.chat_template.name == "alpaca"  # a GPT-2 base without a template
    # The measured decoding defaults travel with the checkpoint, every key present.
    assert ckpt.metadata["generation_defaults"] == GENERATION_DEFAULTS and set(GENERATION_DEFAULTS) == set(GENERATION_KEYS)
    responses = json.loads((out / "test_responses.json").read_text())
    assert len(responses) == 2  # 10% of 21
    assert set(responses[0]) == {"instruction", "input", "output", "model_response"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert 0.0 <= metrics["test_rouge_l_f1"] <= 1.0 and metrics["training_wall_time_s"] > 0
    assert (out / "loss.png").stat().st_size > 1000


def test_lora_on_the_last_block_is_merged_into_plain_weights(tmp_path, base, data):
    out = finetune_instruct(InstructConfig(base=str(base), data=data, out=tmp_path / "lora", method="lora",
                                           lora_rank=2, lora_alpha=4, trainable_blocks=1, epochs=1, batch_size=4,
                                           lr=1e-2, mask_prompt=True, test_responses=False, device="cpu"))
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(after) == set(before)  # merged: no A/B tensors, the base's names
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("blocks.2.") for k in changed)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["activation_cache"] is True and metrics["trainable_blocks"] == 1

    result = evaluate_instruct(out, data, tmp_path / "responses.json", max_new_tokens=3, device="cpu")
    assert result["n"] == len(ENTRIES) and 0.0 <= result["rouge_l_f1"] <= 1.0
    assert len(json.loads((tmp_path / "responses.json").read_text())) == len(ENTRIES)


def test_chained_training_and_the_development_measure(tmp_path, base, data):
    """--chain-turns 2 trains on conversations of two entries; --measure scores the job's own val + test split."""
    out = finetune_instruct(InstructConfig(base=str(base), data=data, out=tmp_path / "chain", method="full",
                                           trainable_blocks=1, chain_turns=2, epochs=1, batch_size=4, lr=1e-3,
                                           mask_prompt=True, test_responses=False, device="cpu"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sizes"]["train"] == 17 and metrics["train_sequences"] == 9  # 8 pairs and one left alone

    summary = measure_instruct(out, data, tmp_path / "measure.json", max_new_tokens=3, device="cpu")
    written = json.loads((tmp_path / "measure.json").read_text())
    assert summary["n_items"] == 4 == len(written["records"])  # of 21 entries: 2 test and 2 validation
    assert summary["conversations"]["n"] == len(read_dialogues()) == len(written["conversation_records"])
    assert 0.0 <= summary["rouge_l_f1"] <= 1.0 and summary["sampling"] == "greedy"
    # Sampling answers every item once per sample.
    sampled = measure_instruct(out, data, tmp_path / "s.json", max_new_tokens=3, device="cpu", samples=2,
                               sampling=SamplingConfig(temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=5))
    assert sampled["samples"] == 2 and sampled["conversations"]["n"] == 2 * len(read_dialogues())
    with pytest.raises(ValueError, match="--samples must be >= 1"):
        measure_instruct(out, data, tmp_path / "x.json", samples=0)


def test_bad_inputs_are_clear_errors(tmp_path, base, data):
    with pytest.raises(BaseModelError, match="no checkpoint directory there"):
        finetune_instruct(InstructConfig(base=str(tmp_path / "missing"), data=data, out=tmp_path / "o"))
    few = tmp_path / "few.json"
    few.write_text(json.dumps(ENTRIES[:5]))
    with pytest.raises(InstructDataError, match="few.json: 5 entries leave the .* split empty"):
        finetune_instruct(InstructConfig(base=str(base), data=few, out=tmp_path / "o"))
    with pytest.raises(ValueError, match="--trainable-blocks 7 exceeds the base's 3 blocks"):
        finetune_instruct(InstructConfig(base=str(base), data=data, out=tmp_path / "o", trainable_blocks=7))
    assert not (tmp_path / "o").exists()


def test_a_lora_fine_tune_exports_to_transformers_with_the_adapters_merged(tmp_path, base, data):
    """The fine-tune saves merged weights, so `scratchgpt export` needs no LoRA step of its own."""
    transformers = pytest.importorskip("transformers")
    from core.weights.export_hf import export_hf

    out = finetune_instruct(InstructConfig(base=str(base), data=data, out=tmp_path / "lora", method="lora",
                                           lora_rank=2, lora_alpha=4, trainable_blocks=0, epochs=2, batch_size=4, lr=5e-2,
                                           test_responses=False, device="cpu"))
    tuned = load_checkpoint(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(tuned, tmp_path / "hf")).eval()
    ids = torch.tensor([tuned.tokenizer.encode(tuned.chat_template.render([{"role": "user", "content": "Repeat red."}]))])
    with torch.no_grad():
        ours, theirs, before = tuned.model(ids), hf(ids).logits, load_checkpoint(base).model(ids)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert float((ours - before).abs().max()) > 100 * 1e-4  # the adapters moved the logits well past the tolerance
