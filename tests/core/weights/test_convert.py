"""core.weights.convert: raw downloads (Hugging Face directories, GGUF files, OpenAI's TensorFlow
release) to our checkpoint, checked against the model they came from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from core.tokenizer.gguf import read_gguf_metadata, tokenizer_from_gguf
from core.weights.checkpoint import load_checkpoint
from core.weights.convert import ConversionError, convert_to_checkpoint
from core.weights.openai_tf import TensorFlowRequiredError


def test_convert_hf_gpt2_to_checkpoint(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("SCRATCHGPT_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    hf.save_pretrained(tmp_path / "raw")
    out = convert_to_checkpoint(tmp_path / "raw", "tiny-gpt2")
    assert out == tmp_path / "home" / "models" / "tiny-gpt2"
    ckpt = load_checkpoint(out)
    ids = torch.tensor([ckpt.tokenizer.encode("Hello, world")])
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    assert ckpt.chat_template is None and ckpt.metadata["name"] == "tiny-gpt2"


def test_what_cannot_be_converted_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=500, n_embd=32, n_layer=1, n_head=2,
                                                              n_positions=64))
    hf.save_pretrained(tmp_path / "raw")
    with pytest.raises(ConversionError, match="vocab 500 does not use GPT-2's tokenizer"):
        convert_to_checkpoint(tmp_path / "raw", "odd-gpt2", dest=tmp_path / "ckpt")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConversionError, match="expected a .gguf file or a Hugging Face checkpoint directory"):
        convert_to_checkpoint(tmp_path / "weights.bin", "x", dest=tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_an_openai_tf_folder_goes_to_its_reader(tmp_path, monkeypatch):
    """hparams.json without config.json is OpenAI's release: read through core.weights.openai_tf."""
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as on a machine without the optional extra
    (tmp_path / "hparams.json").write_text(json.dumps({"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768,
                                                       "n_head": 12, "n_layer": 12}))
    with pytest.raises(TensorFlowRequiredError, match="needs TensorFlow"):
        convert_to_checkpoint(tmp_path, "gpt2-124m", dest=tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def _smollm2_style_hub_dir(smollm2_gguf, directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json laid out as on the hub (SmolLM2's digit split + ByteLevel),
    built from the vocabulary in the GGUF file."""
    meta = read_gguf_metadata(smollm2_gguf)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, t in enumerate(tokens) if types[i] == 3]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    doc = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                 byte_level]},
        "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": meta["tokenizer.ggml.merges"]},
    }
    (directory / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": meta["tokenizer.chat_template"],
    }), encoding="utf-8")


def test_convert_hf_llama_dir_with_hub_tokenizer(smollm2_gguf, tmp_path):
    """The hub route for SmolLM2: safetensors + tokenizer.json -> our checkpoint, tokenizing as the GGUF does."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    raw = tmp_path / "raw"
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=49152, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )).eval()
    hf.save_pretrained(raw)
    _smollm2_style_hub_dir(smollm2_gguf, raw)
    ckpt = load_checkpoint(convert_to_checkpoint(raw, "smollm2-hub", dest=tmp_path / "ckpt"))

    reference = tokenizers.Tokenizer.from_file(str(raw / "tokenizer.json"))
    from_gguf, _ = tokenizer_from_gguf(smollm2_gguf)
    for text in ["What is the capital of France?", "a  1", "x = 12345 + 0.5\n\n\tdef f():", "naïve café ²³",
                 "<|im_start|>user\nhi<|im_end|>\n"]:
        ids = ckpt.tokenizer.encode(text, allowed_special="all")
        assert ids == reference.encode(text).ids == from_gguf.encode(text, allowed_special="all"), text
    assert (ckpt.tokenizer.bos_id, ckpt.tokenizer.eos_id) == (1, 2)
    assert ckpt.chat_template.stop == ["<|im_end|>"]
    ids = torch.tensor([ckpt.tokenizer.encode("The capital of France")])
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_measured_generation_defaults_go_into_the_checkpoint(tmp_path, monkeypatch):
    """A model with measured decoding defaults gets them in its metadata on conversion, and a checkpoint
    converted before they were measured gets them once on the next `download` (a user's own stay)."""
    from core.model import GPTModel, ModelConfig
    from core.tokenizer.gpt2 import gpt2_tokenizer
    from core.weights.catalogue import GENERATION_KEYS, SMOLLM2, generation_defaults_for
    from core.weights.checkpoint import save_checkpoint
    from core.weights.convert import stamp_generation_defaults

    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64))
    hf.save_pretrained(tmp_path / "raw")
    measured = generation_defaults_for("smollm2")
    assert measured is not None and set(measured) == set(GENERATION_KEYS)
    # The defaults follow the catalogue name (a tiny stand-in for the real weights here).
    assert load_checkpoint(convert_to_checkpoint(tmp_path / "raw", SMOLLM2, dest=tmp_path / "a")).metadata[
        "generation_defaults"] == measured
    assert "generation_defaults" not in load_checkpoint(
        convert_to_checkpoint(tmp_path / "raw", "tiny-gpt2", dest=tmp_path / "b")).metadata

    model = GPTModel(ModelConfig(family="gpt2", vocab_size=50257, context_length=16, emb_dim=8, n_layers=1, n_heads=2,
                                 hidden_dim=16))
    old = save_checkpoint(tmp_path / "old", model, gpt2_tokenizer(), metadata={"name": SMOLLM2})
    assert stamp_generation_defaults(old, SMOLLM2) is True
    assert load_checkpoint(old).metadata == {"name": SMOLLM2, "generation_defaults": measured}
    assert stamp_generation_defaults(old, SMOLLM2) is False
    own = save_checkpoint(tmp_path / "own", model, gpt2_tokenizer(),
                          metadata={"generation_defaults": {"temperature": 1.5}})
    assert stamp_generation_defaults(own, SMOLLM2) is False
    assert load_checkpoint(own).metadata["generation_defaults"] == {"temperature": 1.5}
    assert stamp_generation_defaults(old, "tiny-gpt2") is False
