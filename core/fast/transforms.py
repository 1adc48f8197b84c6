"""Serving-speed transforms for a trained model: opt-in, inference only, same tokens.

The model in ``core.model`` is written to be read; this module makes a loaded
model faster to *serve* without touching its parameters or state-dict names.
Each transform is a flag of :class:`FastConfig`, and each has a test that the
greedy tokens (and, where they are computed, the logits) match the plain model.

Decoding one token at batch 1 reads every weight once and does little
arithmetic with it, so its speed is the memory bandwidth divided by the bytes
read (Pope et al., 2022, "Efficiently Scaling Transformer Inference"). The
transforms therefore cut bytes and per-step overhead:

- ``prepack``: linear weights reordered once into oneDNN's blocked layout, so
  the CPU kernels stop repacking them on every call (what torch.compile's
  freezing does for CPU linears, without compiling). Same arithmetic, so the
  same logits up to float summation order. In bf16 this is what lets the AMX
  units run at all speed; at batch 8 it halves the fp32 matmul time.
- ``screened_head`` (fp32 models; from one row with panels, else two): the output layer (vocabulary
  x d, a third of GPT-2 small's bytes) is first scored with a bf16 copy of its
  weight, half the bytes; a rigorous bound on that copy's error names the few tokens that
  can still be the maximum, and only those are scored in fp32. Greedy decoding
  gets the argmax of the fp32 logits, not an approximation. It is the
  screen-then-verify pattern of two-stage retrieval: the cheap pass proposes,
  the exact one decides.
- ``panels`` (fp32 and bf16 models on a CPU with AVX-512): the linear layers
  and output layer of a decoding step (up to eight rows) read their weights
  from a copy in 16-column panels through our C++ kernel
  (``core.fast.panels``), which streams them at about this machine's read
  bandwidth, 1.2x MKL's fp32 matrix-vector product at one row and 2-3x
  oneDNN's packed kernels at eight rows and in bf16. Summed in fp32: the same
  products up to summation order. The screened output layer scores its bf16
  screen through it too, from one row up. Longer inputs (prefill) keep the
  other paths.
- ``fused_ops`` (fp32 models on the CPU): each RMSNorm and rotary
  embedding becomes one call of our C++ kernel (``core.fast.fused_ops``) instead of
  a chain of small torch kernels whose dispatch dominates at one token.
- ``fused_layers`` (fp32 models: GPT-2 with panels, Llama with GGUF blocks): each
  layer of a decoding step is one call of our C++ kernel (``core.fast.fused_layers``):
  norms, attention over the cache, the activation and residuals around the
  products, instead of twenty-odd torch calls whose dispatch costs more than
  their arithmetic at one token. Within fp32 rounding of the block's own code.
- ``speculative`` (fp32 GPT-2 with fused layers): decoding one sequence
  (a lone request, or a sequence running alone in ``core.serving``'s engine),
  an int8 copy of the same weights drafts up to seven tokens and one fp32 pass
  checks them (``core.fast.speculative``): greedy decoding gets the fp32 model's
  tokens and sampling its distribution, with its weights read about once per
  eight tokens.
- ``cuda_graphs`` (models on a CUDA GPU): each decoding step after the
  prompt's (of a request, or of a sequence running alone in the engine) is replayed from a CUDA graph recorded once per batch size and
  cache length (``core.fast.cuda_graphs``): one launch instead of one per kernel.
  The same logits up to summation order.
- ``compile``: ``torch.compile`` with ``freezing`` (weights become constants
  that inductor prepacks and folds, pointwise ops fuse). Minutes of
  compilation on a small CPU, so it is off by default, :func:`make_fast` warms
  it up and reports the time, and inductor caches what it built under
  ``$SCRATCHGPT_HOME/inductor`` (unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise).

Cast the model to its serving dtype and device *before* calling :func:`make_fast`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.fast import fused_layers, fused_ops
from core.fast.cuda_graphs import GraphedDecoder
from core.fast.gguf_matvec import attach_gguf_blocks
from core.fast.kernels import FastPathError
from core.fast.packed import PackedHead, onednn_available, pack_linears
from core.fast.panels import Panels, kernels as panel_kernels
from core.fast.screened_head import ScreenedHead
from core.fast.serving import FastReport, ServingDecoder
from core.fast.speculative import SelfDraft, drafts_for
from core.generation.generate import GenerationConfig, decode_steps
from core.paths import cache_dir
from core.weights.gguf import checkpoint_blocks


# -- the transforms together ----------------------------------------------------


@dataclass
class FastConfig:
    """Which serving transforms :func:`make_fast` applies (see the module docstring)."""

    prepack: bool = True
    panels: bool = True
    screened_head: bool = True
    fused_ops: bool = True
    fused_layers: bool = True
    speculative: bool = True
    cuda_graphs: bool = True
    compile: bool = False
    batch_hint: int = 1  # the decode batch size the packed layouts are chosen for

    def __post_init__(self) -> None:
        if self.batch_hint < 1:
            raise ValueError(f"batch_hint must be >= 1, got {self.batch_hint}")


def make_fast(model: nn.Module, cfg: FastConfig | None = None, gguf_blocks: dict | None = None) -> ServingDecoder:
    """A serving decoder for a ``GPTModel`` with the transforms of ``cfg``; the model is changed in
    place (faster modules in place of its linear layers and blocks) and put in eval mode.

    Call it last: after loading the weights and casting to the serving dtype
    and device. A transform that does not fit (no oneDNN, a GPU, a bf16 head
    for ``screened_head``) is skipped and says why in the decoder's ``report``.

    ``gguf_blocks`` (from ``core.weights.gguf.read_gguf_blocks`` or a
    checkpoint's ``core.weights.gguf.load_blocks``): the quantized blocks the
    model's weights were read from; the layers they hold then decode from them
    (``core.fast.gguf_matvec``), and the other transforms apply to the rest.
    """
    cfg = cfg or FastConfig()
    decoder = ServingDecoder(model)
    report = decoder.report
    model.eval()
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise FastPathError("make_fast: this model is already compiled; call make_fast once, on the plain model")
    if gguf_blocks:
        _use_gguf_blocks(decoder, gguf_blocks)
    weight = model.head_weight
    panels = _panels_fit(decoder, cfg)
    if cfg.screened_head and decoder.argmax_head is not None:
        report.skipped["screened_head"] = "the output layer decodes from GGUF blocks"
    elif cfg.screened_head and cfg.compile:
        report.skipped["screened_head"] = "the compiled forward pass computes the plain output layer"
    elif cfg.screened_head:
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_available(torch.bfloat16):
            decoder.argmax_head = ScreenedHead(weight, cfg.batch_hint, panels=panels)
            report.applied.append("screened_head")
        else:
            reason = "the head is already half precision" if weight.dtype != torch.float32 else "needs a CPU with oneDNN bf16"
            report.skipped["screened_head"] = reason
    onednn = False
    if cfg.prepack and cfg.compile:
        report.skipped["prepack"] = "inductor's freezing packs the weights of the compiled model"
    elif cfg.prepack and (weight.device.type != "cpu" or not onednn_available(weight.dtype)):
        report.skipped["prepack"] = f"oneDNN does not run {weight.dtype} on {weight.device.type}"
    elif cfg.prepack and panels and weight.dtype == torch.float32:
        # Decoding's few rows take the panels; from about 32 rows (a prompt) MKL's product of
        # the plain weight is as fast as oneDNN's packed one, so a third copy would buy nothing.
        report.skipped["prepack"] = "fp32 decoding reads the panels, and prompts are as fast unpacked"
    else:
        onednn = cfg.prepack
    if onednn or panels:
        n = pack_linears(model, cfg.batch_hint, onednn, panels)
        packed = [f"{n} linears"] if n else []
        if decoder.head is None:
            decoder.head = PackedHead(cfg.batch_hint, onednn, Panels() if panels else None)
            packed.append("the output layer")
        for name, used in (("prepack", onednn), ("panels", panels)):
            if used and packed:
                report.applied.append(f"{name} ({' and '.join(packed)})")
    if cfg.fused_ops:
        _use_fused_ops(model, cfg, report)
    if cfg.fused_layers and weight.dtype == torch.float32 and weight.device.type == "cpu" and not cfg.compile:
        _use_fused_layers(model, report)
    if cfg.speculative:
        _use_draft(decoder)
    if cfg.cuda_graphs and weight.device.type == "cuda":
        _use_cuda_graphs(decoder, cfg)
    if cfg.compile:
        report.compile_seconds = compile_model(model, cfg.batch_hint)
        report.applied.append("compile")
    return decoder


def fast_for_serving(checkpoint, prefix_cache=None) -> ServingDecoder:
    """The serving decoder the service and the CLI decode with, for a loaded causal-LM checkpoint,
    keeping recent caches in ``prefix_cache`` (``core.fast.prefix_cache.PrefixCache``) if given.

    The same decoder serves ``core.serving``'s engine: its batched steps use the decoder's output
    layers and kernels, and a sequence running alone there takes the draft of speculative decoding
    or the CUDA graphs, as a lone request of the command line does.

    On the CPU: a checkpoint that carries GGUF blocks decodes from them in fp32
    (``core.fast.gguf_matvec``: the same weights in a fifth of the bytes); any other
    fp32 or bf16 model takes :func:`make_fast`'s defaults (panels, the screened
    output layer, oneDNN copies where they pay). On a CUDA GPU, in any dtype:
    decoding steps replayed from CUDA graphs. Where nothing applies (fp16 on the
    CPU, other devices) the decoder is the plain loop. A damaged blocks file raises ValueError.
    """
    model = checkpoint.model
    weight = model.head_weight
    if weight.device.type == "cuda":
        cpu_only = ("prepack", "panels", "screened_head", "fused_ops", "fused_layers", "speculative")
        decoder = make_fast(model, FastConfig(**dict.fromkeys(cpu_only, False)))
    elif weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        decoder = ServingDecoder(model)
        decoder.report.skipped["all"] = f"no fast path for {weight.dtype} on {weight.device.type}"
    else:
        blocks = checkpoint_blocks(checkpoint.path, checkpoint.metadata) if weight.dtype == torch.float32 else {}
        if blocks:
            # Every layer decodes from its blocks: packed copies would hold the weights twice more for nothing.
            decoder = make_fast(model, FastConfig(prepack=False, panels=False, screened_head=False), gguf_blocks=blocks)
        else:
            decoder = make_fast(model)
    decoder.prefix_cache = prefix_cache
    return decoder


def _panels_fit(decoder: ServingDecoder, cfg: FastConfig) -> bool:
    """Whether decoding's linear layers can read panels (``core.fast.panels``); if not, why is reported."""
    model, report = decoder.model, decoder.report
    weight = model.head_weight
    if not cfg.panels:
        return False
    if decoder.head is not None and not any(type(m) is nn.Linear for m in model.modules()):
        return False  # every layer already has its fast path (GGUF blocks): nothing to build the kernel for
    if cfg.compile:
        report.skipped["panels"] = "inductor's freezing packs the weights of the compiled model"
    elif weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        dtype = str(weight.dtype).removeprefix("torch.")
        report.skipped["panels"] = f"the kernel is for fp32 and bf16 on the CPU, this model is {dtype} on {weight.device.type}"
    else:
        try:
            panel_kernels()  # builds the kernel, or says why it cannot
            return True
        except FastPathError as err:
            report.skipped["panels"] = str(err)
    return False


def _use_gguf_blocks(decoder: ServingDecoder, blocks: dict) -> None:
    report = decoder.report
    try:
        skipped, head = attach_gguf_blocks(decoder.model, blocks)
    except FastPathError as err:
        report.skipped["gguf_blocks"] = str(err)
        return
    if head is not None:
        decoder.head = decoder.argmax_head = head
    types = sorted({t for t, _ in blocks.values()})
    report.applied.append(f"gguf_blocks ({len(blocks) - len(skipped)} of {len(blocks)} weights, {'/'.join(types)})")
    if skipped:
        report.skipped["gguf_blocks for"] = "; ".join(skipped[:3]) + (f"; {len(skipped) - 3} more" if len(skipped) > 3 else "")


def _use_fused_ops(model: nn.Module, cfg: FastConfig, report: FastReport) -> None:
    weight = model.head_weight
    if not any(fused_ops.fusable(model)):
        return
    if cfg.compile:
        report.skipped["fused_ops"] = "inductor fuses these operations in the compiled model"
    elif weight.device.type != "cpu" or weight.dtype != torch.float32:
        dtype = str(weight.dtype).removeprefix("torch.")
        report.skipped["fused_ops"] = f"the kernels are fp32 CPU only, this model is {dtype} on {weight.device.type}"
    else:
        try:
            count = fused_ops.use_fused_ops(model)
        except FastPathError as err:
            report.skipped["fused_ops"] = str(err)
            return
        if count:
            report.applied.append(f"fused_ops ({count} RMSNorms and rotary embeddings)")


def _use_fused_layers(model: nn.Module, report: FastReport) -> None:
    if not any(fused_layers.fusable(block) for block in model.blocks):
        return  # no layer has its weights as panels or GGUF blocks
    try:
        count = fused_layers.use_fused_layers(model)
    except FastPathError as err:
        report.skipped["fused_layers"] = str(err)
        return
    report.applied.append(f"fused_layers ({count} layers, one kernel call each when decoding)")


def _use_draft(decoder: ServingDecoder) -> None:
    model, report = decoder.model, decoder.report
    if not drafts_for(model):
        if model.head_weight.dtype == torch.float32 and model.pos_emb is not None:
            report.skipped["speculative"] = "the draft decodes through fused GPT-2 layers, and this model has none"
        return  # a half-precision model has nothing cheaper to draft with; Llama layers have no draft yet
    # A bf16 draft can share the bf16 copy of the output layer that the screened head keeps.
    screen = decoder.argmax_head.panels if isinstance(decoder.argmax_head, ScreenedHead) else None
    decoder.draft = SelfDraft(model, head_screen=screen)
    report.applied.append(
        f"speculative (one sequence: int8 drafts of up to {decoder.draft.max_draft} tokens, checked in fp32)")


def _use_cuda_graphs(decoder: ServingDecoder, cfg: FastConfig) -> None:
    report = decoder.report
    if cfg.compile:
        report.skipped["cuda_graphs"] = "the compiled model's shapes change with the cache"
        return
    decoder.graphs = GraphedDecoder(decoder.model, decoder.logits)
    report.applied.append("cuda_graphs (decoding steps replayed, one graph per batch size and cache length)")


def inductor_cache_dir() -> Path:
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", cache_dir() / "inductor"))


def compile_model(model: nn.Module, batch_hint: int = 1) -> float:
    """``torch.compile`` the model's forward with freezing, in place, and warm it up; returns seconds.

    Shapes are dynamic from the start (prompt length, cache length and batch
    all vary between requests), so the warm-up compiles each graph the decoding
    loop uses once: prefill and decode, unpadded and left-padded.
    """
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
    start = time.perf_counter()
    model.compile(dynamic=True, options={"freezing": True})
    warm = GenerationConfig(max_new_tokens=3)
    rows = max(2, batch_hint)
    for prompts in ([[1] * 5] * rows, [[1] * 6] + [[1] * 4] * (rows - 1)):
        for _ in decode_steps(model, prompts, warm):
            pass
    return time.perf_counter() - start
