"""Hugging Face checkpoints -> our GPTModel: same logits and same greedy tokens as transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.model.config import ModelConfig
from core.generation.generate import GenerationConfig, generate
from core.weights.hf import (
    HFWeightsError,
    expected_shapes,
    load_hf_checkpoint,
    load_hf_gpt2,
    load_hf_llama,
    llama_config_from_hf,
)
from core.model import GPTModel

transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11]
N_NEW = 20


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw the weights wider than HF's 0.02 init so logits are far apart and greedy ties cannot occur."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "layernorm.weight", "norm.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def _ours(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> GPTModel:
    model = GPTModel(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _assert_parity(hf_model, ours: GPTModel) -> None:
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = hf_model(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    ref_tokens = _hf_greedy(hf_model, PROMPT, N_NEW)
    (ours_tokens,) = generate(ours, [PROMPT], GenerationConfig(max_new_tokens=N_NEW))
    assert ours_tokens == ref_tokens


# ---------------------------------------------------------------------------
# GPT-2
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=500,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    _spread_weights(model, 0)
    return model


def test_gpt2_safetensors_parity(hf_gpt2, tmp_path):
    hf_gpt2.save_pretrained(tmp_path)
    cfg, sd = load_hf_gpt2(tmp_path)
    assert (cfg.family, cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.context_length, cfg.vocab_size) == (
        "gpt2", 64, 2, 4, 128, 500)
    assert cfg.tie_embeddings and "out_head.weight" not in sd and cfg.qkv_bias
    _assert_parity(hf_gpt2, _ours(cfg, sd))


def test_gpt2_pytorch_bin_parity(hf_gpt2, tmp_path):
    # transformers 5 only writes safetensors; older versions wrote this file,
    # a plain torch.save of the state dict (lm_head included, tied).
    hf_gpt2.config.to_json_file(tmp_path / "config.json")
    torch.save(hf_gpt2.state_dict(), tmp_path / "pytorch_model.bin")
    cfg, sd = load_hf_gpt2(tmp_path)
    _assert_parity(hf_gpt2, _ours(cfg, sd))


def test_gpt2_openai_community_layout(hf_gpt2, tmp_path):
    """openai-community/gpt2's own file: no "transformer." prefix, plus old causal-mask buffers."""
    hf_gpt2.config.to_json_file(tmp_path / "config.json")
    tensors = {k.removeprefix("transformer."): v.contiguous() for k, v in hf_gpt2.state_dict().items()
               if k != "lm_head.weight"}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, 128, 128).tril()
    save_file(tensors, tmp_path / "model.safetensors")
    cfg, sd = load_hf_checkpoint(tmp_path)
    _assert_parity(hf_gpt2, _ours(cfg, sd))


def test_gpt2_conv1d_transposed(hf_gpt2, tmp_path):
    hf_gpt2.save_pretrained(tmp_path)
    _, sd = load_hf_gpt2(tmp_path)
    c_attn = hf_gpt2.transformer.h[1].attn.c_attn.weight  # Conv1D: (in, out)
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], c_attn.t())
    assert torch.equal(sd["blocks.1.ff.proj.weight"], hf_gpt2.transformer.h[1].mlp.c_proj.weight.t())


def test_gpt2_untied_head(tmp_path):
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=300, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0)).eval()
    _spread_weights(model, 1)
    model.save_pretrained(tmp_path)
    cfg, sd = load_hf_gpt2(tmp_path)
    assert not cfg.tie_embeddings
    assert torch.equal(sd["out_head.weight"], model.lm_head.weight)
    _assert_parity(model, _ours(cfg, sd))


def test_gpt2_bad_shape_names_the_tensor(hf_gpt2, tmp_path):
    hf_gpt2.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.weight"] = tensors["transformer.h.1.mlp.c_fc.weight"][:, :100].contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(HFWeightsError, match=r"h\.1\.mlp\.c_fc\.weight.*\(64, 100\)"):
        load_hf_gpt2(tmp_path)


def test_gpt2_missing_and_unknown_tensors(hf_gpt2, tmp_path):
    hf_gpt2.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["transformer.h.0.attn.extra"] = torch.zeros(3)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(HFWeightsError, match="h.0.attn.extra"):
        load_hf_gpt2(tmp_path)
    del tensors["transformer.h.0.attn.extra"], tensors["transformer.ln_f.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(HFWeightsError, match="ln_f.bias is missing"):
        load_hf_gpt2(tmp_path)


def test_gpt2_rejects_other_activation(hf_gpt2, tmp_path):
    hf_gpt2.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFWeightsError, match="relu"):
        load_hf_gpt2(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(HFWeightsError, match="no config.json"):
        load_hf_gpt2(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2,
                                                      "n_positions": 8, "vocab_size": 10}))
    with pytest.raises(HFWeightsError, match="no weights found"):
        load_hf_gpt2(tmp_path)


def test_truncated_safetensors(hf_gpt2, tmp_path):
    hf_gpt2.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(HFWeightsError, match="truncated or corrupt"):
        load_hf_gpt2(tmp_path)


# ---------------------------------------------------------------------------
# Llama
# ---------------------------------------------------------------------------


def _hf_llama(tied: bool, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=500, max_position_embeddings=128, rope_theta=50000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    _spread_weights(model, seed)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_llama_gqa_parity(tied, tmp_path):
    hf = _hf_llama(tied, seed=2 + tied)
    # Small shards exercise model.safetensors.index.json.
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    cfg, sd = load_hf_llama(tmp_path)
    assert (cfg.family, cfg.n_heads, cfg.kv_heads, cfg.ff_dim, cfg.rope_theta, cfg.norm_eps) == (
        "llama", 4, 2, 160, 50000.0, 1e-5)
    assert cfg.tie_embeddings is tied and ("out_head.weight" in sd) is not tied
    # Fused rows: 4 query heads, then 2 key heads, then 2 value heads, 16 dims each.
    assert sd["blocks.0.attn.qkv.weight"].shape == (128, 64)
    assert torch.equal(sd["blocks.0.attn.qkv.weight"][64:96], hf.model.layers[0].self_attn.k_proj.weight)
    _assert_parity(hf, _ours(cfg, sd))


def test_llama_missing_shard(tmp_path):
    _hf_llama(True, 4).save_pretrained(tmp_path, max_shard_size="100KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(HFWeightsError, match="shard"):
        load_hf_llama(tmp_path)


def test_llama3_rope_scaling_goes_to_extra():
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    base = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "head_dim": 64,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
    # transformers 4 layout (Llama 3.2's published config.json) and transformers 5 layout.
    old = llama_config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": scaling})
    new = llama_config_from_hf({**base, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
    for cfg in (old, new):
        assert cfg.rope_theta == 500000.0 and cfg.kv_heads == 8 and cfg.tie_embeddings
        assert cfg.extra["rope_scaling"] == scaling
    with pytest.raises(HFWeightsError, match="yarn"):
        llama_config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(HFWeightsError, match="head_dim"):
        llama_config_from_hf({**base, "head_dim": 128})


@pytest.mark.parametrize("cfg", [
    ModelConfig.from_preset("gpt2-small", n_layers=2),
    ModelConfig(family="gpt2", emb_dim=32, n_heads=4, n_layers=1, qkv_bias=False, tie_embeddings=False, vocab_size=50),
    ModelConfig.from_preset("smollm2-135m", n_layers=2, context_length=64),
])
def test_expected_shapes_match_the_model(cfg):
    with torch.device("meta"):
        model = GPTModel(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected_shapes(cfg) == want


# ---------------------------------------------------------------------------
# OpenAI's TensorFlow release (core.weights.openai_tf reuses the GPT-2 converter)
# ---------------------------------------------------------------------------


def _openai_variables(hf_model) -> dict:
    """The variables OpenAI's model.ckpt holds for this model: TF names, (1, in, out) convolution kernels."""
    out = {}
    for name, t in hf_model.transformer.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        arr = t.numpy()
        if name in ("wte.weight", "wpe.weight"):
            out["model/" + name.removesuffix(".weight")] = arr
            continue
        parts = name.split(".")
        if parts[0] == "ln_f":
            out["model/ln_f/" + {"weight": "g", "bias": "b"}[parts[1]]] = arr
            continue
        module = "/".join(parts[2:-1])
        if parts[-1] == "bias":
            kind = "b"
        elif module.startswith("ln"):
            kind = "g"
        else:
            kind, arr = "w", arr[None]
        out[f"model/h{parts[1]}/{module}/{kind}"] = arr
    return out


def test_openai_tf_variables_parity(hf_gpt2):
    from core.weights.openai_tf import config_from_hparams, convert_openai_variables

    cfg = config_from_hparams({"n_vocab": 500, "n_ctx": 128, "n_embd": 64, "n_head": 4, "n_layer": 2})
    variables = _openai_variables(hf_gpt2)
    assert "model/h1/attn/c_attn/w" in variables and variables["model/h1/attn/c_attn/w"].shape == (1, 64, 192)
    _assert_parity(hf_gpt2, _ours(cfg, convert_openai_variables(variables, cfg)))


def test_openai_errors(hf_gpt2, tmp_path):
    from core.weights.openai_tf import (
        OpenAIWeightsError, TensorFlowRequiredError, config_from_hparams, convert_openai_variables, load_openai_gpt2,
    )

    cfg = config_from_hparams({"n_vocab": 500, "n_ctx": 128, "n_embd": 64, "n_head": 4, "n_layer": 2})
    variables = _openai_variables(hf_gpt2)
    variables["model/h0/attn/c_attn/w"] = variables["model/h0/attn/c_attn/w"][0]
    with pytest.raises(OpenAIWeightsError, match=r"model/h0/attn/c_attn/w.*\(1, in, out\)"):
        convert_openai_variables(variables, cfg)
    with pytest.raises(OpenAIWeightsError, match="unexpected variable"):
        convert_openai_variables({"model/h0/foo/w": variables["model/wte"]}, cfg)
    with pytest.raises(OpenAIWeightsError, match="hparams.json"):
        load_openai_gpt2(tmp_path)
    (tmp_path / "hparams.json").write_text(json.dumps({"n_vocab": 500, "n_ctx": 128, "n_embd": 64, "n_head": 4,
                                                       "n_layer": 2}))
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        with pytest.raises(TensorFlowRequiredError, match=r"pip install 'scratchgpt\[tensorflow\]'"):
            load_openai_gpt2(tmp_path)
    else:
        with pytest.raises(OpenAIWeightsError, match="no TensorFlow checkpoint"):
            load_openai_gpt2(tmp_path)


def test_llama3_rope_scaling_parity(tmp_path):
    """Llama 3.1/3.2 checkpoints: logits match only if the model applies the llama3 frequency scaling."""
    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=500, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    _spread_weights(hf, 5)
    hf.save_pretrained(tmp_path)
    ours_cfg, sd = load_hf_llama(tmp_path)
    assert ours_cfg.extra["rope_scaling"]["factor"] == 4.0
    _assert_parity(hf, _ours(ours_cfg, sd))
