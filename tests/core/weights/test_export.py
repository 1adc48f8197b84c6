"""Exports: our checkpoints as Hugging Face directories and GGUF files that transformers, the gguf
package and our own readers load back with the same logits and the same token ids.

Two tiny models: a GPT-2 without QKV biases (as the book pretrains it) with GPT-2's tokenizer and
the Alpaca template, and a Llama with grouped-query attention, an untied head, a byte-level BPE
trained here with SmolLM2's pre-tokenizer, ChatML, and more embedding rows than token ids.
"""

from __future__ import annotations

import json

import pytest
import torch

from core.generation.chat_template import ALPACA, CHATML
from core.model import GPTModel, ModelConfig
from core.tokenizer import TiktokenTokenizer, tokenizer_from_gguf
from core.tokenizer.bpe import BPETokenizer
from core.tokenizer.gguf import SMOLLM_PATTERN
from core.tokenizer.gpt2 import gpt2_tokenizer
from core.weights.checkpoint import load_checkpoint, save_checkpoint
from core.weights.export_gguf import export_gguf
from core.weights.export_hf import ExportError, export_hf
from core.weights.gguf import load_gguf
from core.weights.hf import load_hf_checkpoint

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11, 64, 2]])
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. In 1813 it cost 3.50 shillings; don't ask   why.\n\n\tCafé, 東京, 🙂 ")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there,\nfriend"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]


def _spread(model: GPTModel, seed: int) -> GPTModel:
    """Weights wider than the default init so that the logits are far apart (differences show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_gain = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if norm_gain else 0.15 * torch.randn(p.shape, generator=g))
    return model.eval()


def _chat_tokenizer() -> TiktokenTokenizer:
    trained = BPETokenizer.train(TEXT * 20, vocab_size=330, pattern=SMOLLM_PATTERN,
                                 special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], name="tiny-chat")
    specials = trained.special_tokens
    return TiktokenTokenizer(trained.ranks, trained.pattern, specials, "tiny-chat",
                             eos_id=specials["<|im_end|>"], bos_id=specials["<|im_start|>"])


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    # context 1024: transformers' GGUF loader sizes GPT-2's position table from n_positions' default.
    cfg = ModelConfig(family="gpt2", vocab_size=50257, context_length=1024, emb_dim=64, n_layers=2, n_heads=4,
                      qkv_bias=False)
    torch.manual_seed(0)
    model = _spread(GPTModel(cfg), 0)
    return save_checkpoint(tmp_path_factory.mktemp("gpt2") / "ckpt", model, gpt2_tokenizer(), chat_template=ALPACA)


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    cfg = ModelConfig(family="llama", vocab_size=352, context_length=128, emb_dim=64, n_layers=2, n_heads=4,
                      n_kv_heads=2, hidden_dim=96, tie_embeddings=False, rope_theta=50000.0)
    torch.manual_seed(1)
    model = _spread(GPTModel(cfg), 1)
    return save_checkpoint(tmp_path_factory.mktemp("llama") / "ckpt", model, _chat_tokenizer(), chat_template=CHATML)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def ckpt(request):
    return load_checkpoint(request.getfixturevalue(f"{request.param}_ckpt"))


@pytest.fixture(scope="module")
def hf_dir(ckpt, tmp_path_factory):
    return export_hf(ckpt, tmp_path_factory.mktemp("export") / "hf")


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


# -- Hugging Face ------------------------------------------------------------------------


def test_hf_export_loads_in_transformers_with_our_logits(ckpt, hf_dir):
    assert {p.name for p in hf_dir.iterdir()} == {
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[ckpt.config.family]
    ours, theirs = _logits(ckpt.model), _logits(hf)
    assert float(ours.std()) > 0.5  # far apart logits, so the comparison means something
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_hf_export_reads_back_through_our_loader(ckpt, hf_dir):
    cfg, sd = load_hf_checkpoint(hf_dir)
    ours = ckpt.model.state_dict()
    if ckpt.config.family == "gpt2":
        # transformers' GPT-2 always has QKV biases: ours had none, so they come back as zeros.
        assert cfg.qkv_bias and not ckpt.config.qkv_bias
        for i in range(cfg.n_layers):
            assert torch.equal(sd.pop(f"blocks.{i}.attn.qkv.bias"), torch.zeros(3 * cfg.emb_dim))
        cfg.qkv_bias = False
    assert cfg == ckpt.config
    assert set(sd) == set(ours) and all(torch.equal(sd[k], ours[k]) for k in ours)


def test_hf_tokenizer_gives_our_ids_and_renders_our_chat_template(ckpt, hf_dir):
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours = ckpt.tokenizer
    special = next(iter(ours.special_tokens))
    text = TEXT + special + " after"
    assert tok.encode(text) == ours.encode(text, allowed_special="all")
    assert tok.decode(ours.encode(TEXT)) == TEXT
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == ckpt.chat_template.render(MESSAGES)
    assert (tok.bos_token_id, tok.eos_token_id) == (ours.bos_id, ours.eos_id)
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    stop = [ours.eos_id] + [ours.special_tokens[s] for s in ckpt.chat_template.stop
                            if s in ours.special_tokens and ours.special_tokens[s] != ours.eos_id]
    assert generation["eos_token_id"] == (stop[0] if len(stop) == 1 else stop)


def test_alpaca_template_needs_the_portable_form():
    """Rendered the way transformers renders (trim_blocks, lstrip_blocks), Alpaca's own text loses
    newlines and its default system prompt; the exported text does not (so the test above can fail)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    ours = ALPACA.render(MESSAGES[1:2])
    assert env.from_string(ALPACA.template).render(messages=MESSAGES[1:2], add_generation_prompt=True) != ours
    assert env.from_string(ALPACA.portable()).render(messages=MESSAGES[1:2], add_generation_prompt=True) == ours


def test_hf_export_in_bf16(llama_ckpt, tmp_path):
    out = export_hf(llama_ckpt, tmp_path / "bf16", outtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    cfg, sd = load_hf_checkpoint(out)
    ours = load_checkpoint(llama_ckpt).model.state_dict()
    assert all(torch.equal(sd[k], ours[k].to(torch.bfloat16).float()) for k in ours)


def test_export_errors(gpt2_ckpt, tmp_path):
    from core.classifier import SequenceClassifier

    with pytest.raises(ExportError, match="q8_0.*not a Hugging Face weight type"):
        export_hf(gpt2_ckpt, tmp_path / "x", outtype="q8_0")
    with pytest.raises(ExportError, match="does not exist"):
        export_hf(tmp_path / "missing", tmp_path / "x")
    clf = SequenceClassifier(GPTModel(ModelConfig(vocab_size=50257, context_length=32, emb_dim=32, n_layers=1,
                                                  n_heads=2)), 2)
    clf_dir = save_checkpoint(tmp_path / "clf", clf, gpt2_tokenizer(), task="classification", labels=["a", "b"])
    for export in (export_hf, export_gguf):
        with pytest.raises(ExportError, match="is a classification model"):
            export(clf_dir, tmp_path / "y")
    # Never over files that are not an earlier export of ours.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="todo.txt"):
        export_hf(gpt2_ckpt, tmp_path / "notes")
    with pytest.raises(ExportError, match="not a GGUF file"):
        export_gguf(gpt2_ckpt, tmp_path / "notes" / "todo.txt")
    with pytest.raises(ExportError, match="is a directory"):
        export_gguf(gpt2_ckpt, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf", "notes"]  # nothing half-written


def test_gguf_export_refuses_what_it_cannot_describe(tmp_path):
    cfg = ModelConfig(family="llama", vocab_size=300, context_length=64, emb_dim=32, n_layers=1, n_heads=2,
                      extra={"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}})
    tok = BPETokenizer.train(TEXT * 5, vocab_size=300, special_tokens=["<|endoftext|>"])
    scaled = save_checkpoint(tmp_path / "scaled", GPTModel(cfg), tok)
    with pytest.raises(ExportError, match="RoPE scaling"):
        export_gguf(scaled, tmp_path / "s.gguf")
    cfg.extra = {}
    odd = BPETokenizer(tok.ranks, r"\S+|\s+", tok.special_tokens, "odd")
    with pytest.raises(ExportError, match="has no llama.cpp name"):
        export_gguf(save_checkpoint(tmp_path / "odd", GPTModel(cfg), odd), tmp_path / "o.gguf")


# -- GGUF --------------------------------------------------------------------------------


def _expected_weights(ckpt, outtype: str) -> dict[str, torch.Tensor]:
    """Our weights as the file should give them back: matrices through fp16 or Q8_0, vectors exact."""
    from gguf.quants import dequantize, quantize

    out = {}
    for name, t in ckpt.model.state_dict().items():
        if t.ndim == 1 or name == "pos_emb.weight":
            out[name] = t
        elif outtype == "f16":
            out[name] = t.half().float()
        else:
            # Q8_0 blocks run along a row, so Llama's Q/K row permutation commutes with them.
            q8 = gguf.GGMLQuantizationType.Q8_0
            out[name] = torch.from_numpy(dequantize(quantize(t.numpy(), q8), q8).copy())
    return out


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_gguf_export_reads_back(ckpt, outtype, tmp_path):
    path = export_gguf(ckpt, tmp_path / "m.gguf", outtype=outtype)
    cfg = ckpt.config

    # The gguf package: metadata and tensor types.
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == cfg.family and meta[f"{cfg.family}.block_count"] == cfg.n_layers
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == {"gpt2": "gpt-2", "llama": "smollm"}[cfg.family]
    assert len(meta["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert meta["tokenizer.ggml.eos_token_id"] == ckpt.tokenizer.eos_id
    assert meta["tokenizer.chat_template"] == ckpt.chat_template.portable()
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    matrix = outtype.upper()
    assert kinds["token_embd.weight"] == matrix and kinds["blk.1.ffn_down.weight"] == matrix
    assert kinds["output_norm.weight"] == "F32"
    if cfg.family == "llama":
        assert kinds["blk.0.attn_q.weight"] == matrix and kinds["output.weight"] == matrix
    else:
        assert kinds["blk.0.attn_qkv.weight"] == matrix and kinds["position_embd.weight"] == "F32"
        assert "output.weight" not in kinds  # tied

    # Our reader: the same weights the file holds, then the logits.
    cfg_back, sd, _ = load_gguf(path)
    if cfg.family == "gpt2":
        for i in range(cfg.n_layers):
            assert torch.equal(sd.pop(f"blocks.{i}.attn.qkv.bias"), torch.zeros(3 * cfg.emb_dim))
        cfg_back.qkv_bias = False
        cfg_back.hidden_dim = None
    assert cfg_back == cfg
    expected = _expected_weights(ckpt, outtype)
    assert set(sd) == set(expected) and all(torch.equal(sd[k], expected[k]) for k in expected)
    rounded = GPTModel(cfg).eval()
    rounded.load_state_dict(expected)
    back = GPTModel(cfg).eval()
    back.load_state_dict(sd)
    torch.testing.assert_close(_logits(back), _logits(rounded), atol=1e-4, rtol=0)
    original = _logits(ckpt.model)
    relative = float((_logits(back) - original).abs().max() / original.abs().max())
    print(f"{cfg.family} {outtype}: max |logit diff| vs the unrounded model, relative {relative:.1e}")
    assert relative < {"f16": 5e-3, "q8_0": 5e-2}[outtype]

    # transformers' GGUF loader: the model the file describes, so the same logits as ours from the file.
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(hf), _logits(back), atol=1e-4, rtol=0)


def test_gguf_tokenizer_and_template_read_back(ckpt, tmp_path):
    path = export_gguf(ckpt, tmp_path / "m.gguf")
    tok, info = tokenizer_from_gguf(path)
    ours = ckpt.tokenizer
    assert tok.encode(TEXT) == ours.encode(TEXT)
    assert (tok.eos_id, tok.bos_id, tok.special_tokens) == (ours.eos_id, ours.bos_id, ours.special_tokens)
    from core.generation.chat_template import ChatTemplate

    template = ChatTemplate("gguf", info["chat_template"], ckpt.chat_template.stop)
    assert template.render(MESSAGES) == ckpt.chat_template.render(MESSAGES)
    # Where transformers' GGUF tokenizer splits text as we do (GPT-2's rule; for SmolLM2's digit
    # rule it has no entry and falls back to GPT-2's), it gives our ids.
    if ckpt.config.family == "gpt2":
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
        assert hf_tok.encode(TEXT) == ours.encode(TEXT)


# -- the real SmolLM2-135M-Instruct (converted from its GGUF by `scratchgpt download`) ---------------


@pytest.fixture(scope="module")
def smollm2_checkpoint():
    from core.paths import cache_dir

    path = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (path / "config.json").is_file():
        pytest.skip("SmolLM2 checkpoint not found: run `scratchgpt download smollm2-135m-instruct`")
    return load_checkpoint(path)


@pytest.mark.slow
def test_smollm2_exports_to_transformers_and_gguf(smollm2_checkpoint, tmp_path):
    ckpt = smollm2_checkpoint
    prompt = ckpt.chat_template.render([{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([ckpt.tokenizer.encode(prompt, allowed_special="all")])
    ours = _logits(ckpt.model, ids)

    hf_dir = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    diff = float((_logits(hf, ids) - ours).abs().max())
    print(f"\nSmolLM2 HF export: transformers vs ours, max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    assert transformers.AutoTokenizer.from_pretrained(hf_dir).encode(prompt) == ids[0].tolist()

    path = export_gguf(ckpt, tmp_path / "smollm2-q8_0.gguf", outtype="q8_0")
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == 2 + 9 * 30 and {t.tensor_type.name for t in reader.tensors} == {"F32", "Q8_0"}
    assert reader.fields["tokenizer.chat_template"].contents() == ckpt.chat_template.portable()
    cfg, sd, _ = load_gguf(path)
    back = GPTModel(cfg).eval()
    back.load_state_dict(sd)
    from_file = _logits(back, ids)
    hf_gguf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                                dtype=torch.float32).eval()
    diff_hf = float((_logits(hf_gguf, ids) - from_file).abs().max())
    relative = float((from_file - ours).abs().max() / ours.abs().max())
    print(f"SmolLM2 Q8_0 GGUF: transformers vs load_gguf max |logit diff| {diff_hf:.2e}; "
          f"vs the fp32 checkpoint, relative {relative:.1e}")
    assert diff_hf < 1e-4 and relative < 5e-2
    assert torch.equal(from_file[0, -1].argmax(), ours[0, -1].argmax())
