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
- ``speculative`` (fp32 GPT-2 with fused layers): decoding one sequence,
  an int8 copy of the same weights drafts up to seven tokens and one fp32 pass
  checks them (``core.fast.speculative``): greedy decoding gets the fp32 model's
  tokens and sampling its distribution, with its weights read about once per
  eight tokens.
- ``cuda_graphs`` (models on a CUDA GPU): each decoding step after the
  prompt's is replayed from a CUDA graph recorded once per batch size and
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

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from core.paths import cache_dir
from core.fast.kernels import FastPathError, needs_autograd, weight_key
from core.fast.panels import Panels, kernels as panel_kernels


@functools.cache
def onednn_available(dtype: torch.dtype) -> bool:
    """Whether torch's oneDNN linear kernels run here for ``dtype`` (CPU only)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def _pack(weight: torch.Tensor, batch_hint: int) -> torch.Tensor:
    # An opaque oneDNN tensor in the blocked layout its matmul kernel reads fastest
    # for about ``batch_hint`` rows of input; any number of rows still works.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# -- prepacked linear layers ----------------------------------------------------


class _PackedCopy:
    """A packed snapshot of a weight, rebuilt when the weight is changed in place or replaced."""

    def __init__(self, batch_hint: int) -> None:
        self.batch_hint = batch_hint
        self.packed: torch.Tensor | None = None
        self.key: tuple | None = None

    def of(self, weight: torch.Tensor) -> torch.Tensor:
        key = weight_key(weight)
        if key != self.key:
            self.packed, self.key = _pack(weight, self.batch_hint), key
        return self.packed

    def __getstate__(self) -> dict:
        # A packed tensor is opaque (no storage to copy or pickle): copies repack on first use.
        return {"batch_hint": self.batch_hint, "packed": None, "key": None}


def _use_packed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # The packed kernels are CPU, inference-only and want matching dtypes;
    # anything else takes plain F.linear. One fp32 row is a matrix-vector product
    # that only streams the weight, where MKL's gemv measured faster than oneDNN's
    # packed kernel (docs/performance.md); packing pays once there are rows to reuse it.
    if x.device.type != "cpu" or x.dtype != weight.dtype or not onednn_available(weight.dtype):
        return False
    if needs_autograd(x, weight):
        return False
    return weight.dtype != torch.float32 or x.numel() > x.shape[-1]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, panels: Panels | None,
            packed: _PackedCopy | None) -> torch.Tensor:
    # Decoding's few rows from the panels, longer inputs from oneDNN's copy, the rest plain.
    if panels is not None and panels.applies(x, weight):
        return panels.linear(x, weight, bias)
    if packed is None or not _use_packed(x, weight):
        return nn.functional.linear(x, weight, bias)
    return _packed_linear(x, packed.of(weight), bias)


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is also kept in the layouts fast kernels read, for inference.

    It holds the original ``weight`` and ``bias`` parameters (so the state dict
    keeps its names and values) plus packed copies, snapshots rebuilt if the
    weight is changed or cast afterwards: ``panels`` (``core.fast.panels``) for
    up to eight rows, and with ``onednn`` a oneDNN-packed copy for the rest.
    Autograd, other devices and other dtypes take the plain ``F.linear``.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = 1, onednn: bool = True, panels: Panels | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # Plain attributes: never saved, never cast.
        self._packed = _PackedCopy(batch_hint) if onednn else None
        self._panels = panels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight, self.bias, self._panels, self._packed)

    def extra_repr(self) -> str:
        layouts = " and ".join(name for name, copy in (("oneDNN", self._packed), ("panels", self._panels)) if copy)
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {layouts}"


class PackedHead(nn.Module):
    """The output layer ``hidden @ weight.T`` with the weight packed as :class:`PackedLinear`'s;
    the weight (possibly the tied embedding) is passed in on each call."""

    def __init__(self, batch_hint: int = 1, onednn: bool = True, panels: Panels | None = None) -> None:
        super().__init__()
        self._packed = _PackedCopy(batch_hint) if onednn else None
        self._panels = panels

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _linear(hidden, weight, None, self._panels, self._packed)


def pack_linears(model: nn.Module, batch_hint: int = 1, onednn: bool = True, panels: bool = False) -> int:
    """Replace every ``nn.Linear`` in ``model`` by a :class:`PackedLinear` with the copies asked for; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child, batch_hint, onednn, Panels() if panels else None))
                count += 1
    return count


# -- screened output layer ----------------------------------------------------

# Unit roundoff: rounding to bf16 (8 significant bits) or fp32 (24) moves a
# value by at most this fraction of itself.
_BF16_UNIT = 2.0**-8
_FP32_UNIT = 2.0**-24


class ScreenedHead(nn.Module):
    """Exact argmax of the fp32 logits ``hidden @ weight.T`` for half the bytes.

    Stage 1 scores every vocabulary row in bf16 (weights rounded once and packed,
    as panels for up to eight rows, for oneDNN beyond; activations rounded per
    call; fp32 sums; the result rounded to bf16). For row j the exact logit z_j
    and the screened score a_j differ by at most

        |z_j - a_j| <= ||h - h~|| ||W_j|| + ||h~|| ||W_j - W~_j||
                       + K u32 ||h~|| ||W~_j|| + 2 u16 |a_j|

    (activation rounding, weight rounding, the K-term fp32 sum in any order,
    the bf16 result), which we bound by one number beta per input row using the
    largest row norms. The true argmax then has a_j >= max(a) - 2 beta, so
    stage 2 scores in fp32 only the rows above that threshold: for GPT-2 small
    a few dozen of 50,257.

    Stage 2 gathers the candidate rows from the model's own weight, passed in on
    each call, so nothing is copied in fp32 and a tied head stays tied.
    """

    def __init__(self, weight: torch.Tensor, batch_hint: int = 1, panels: bool = False) -> None:
        super().__init__()
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not onednn_available(torch.bfloat16):
            raise FastPathError(
                f"screened_head needs an fp32 output layer on a CPU with oneDNN bf16 (got {weight.dtype} on "
                f"{weight.device.type}); build FastConfig(screened_head=False) for this model"
            )
        self.batch_hint = batch_hint
        self.vocab_size, self.dim = weight.shape
        self._panels = Panels(torch.bfloat16) if panels else None  # plain attribute: never saved, never cast
        self._key: tuple | None = None
        self._prepare(weight)

    def _prepare(self, weight: torch.Tensor) -> None:
        """The norms the bound uses, recomputed (and the screen dropped) if the weight changed."""
        if weight_key(weight) == self._key:
            return
        w = weight.detach().float()
        w_bf16 = w.to(torch.bfloat16)
        self._screen = None  # oneDNN's packed bf16 screen, built when first needed
        self.max_row_norm = float(w.norm(dim=1).max())
        self.max_rounding = float((w - w_bf16.float()).norm(dim=1).max())
        self._key = weight_key(weight)

    def __getstate__(self) -> dict:
        # The packed screen is opaque (no storage to copy or pickle): copies rebuild it on first use.
        return {**self.__dict__, "_screen": None, "_key": None}

    def screen(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Stage 1: approximate logits (N, V), as fp32, of fp32 activations (N, d)."""
        self._prepare(weight)
        h_bf16 = h.to(torch.bfloat16)
        if self._panels is not None and self._panels.applies(h_bf16, weight):
            return self._panels.linear(h_bf16, weight).float()
        if self._screen is None:
            self._screen = _pack(weight.detach().to(torch.bfloat16), self.batch_hint)
        return _packed_linear(h_bf16, self._screen, None).float()

    def bound(self, h: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
        """beta (N,): no row's screened score is further than this from its exact logit."""
        h_bf16 = h.to(torch.bfloat16).float()
        h_norm = h_bf16.norm(dim=-1)
        beta = (
            (h - h_bf16).norm(dim=-1) * self.max_row_norm
            + h_norm * self.max_rounding
            + self.dim * _FP32_UNIT * h_norm * self.max_row_norm * 1.01
            + 2 * _BF16_UNIT * approx.abs().amax(dim=-1)
        )
        # Headroom for the fp32 rounding of the norms and sums above.
        return beta * 1.001 + 1e-6

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """hidden (..., d), already normalised; weight (V, d), the head this was built from
        -> logits (..., V): fp32 where a token can be the maximum, -inf elsewhere."""
        shape = hidden.shape
        if hidden.numel() == shape[-1] and self._panels is None:
            # One row: MKL's fp32 matrix-vector product streams the whole head about as fast
            # as oneDNN's bf16 kernel streams the half-size screen (docs/performance.md), so
            # screening saves nothing and its extra passes cost a little. The panel kernel
            # streams the screen at twice that speed, so with it one row is screened too.
            return nn.functional.linear(hidden, weight)
        h = hidden.reshape(-1, shape[-1]).float()
        approx = self.screen(h, weight)
        threshold = approx.amax(dim=-1) - 2 * self.bound(h, approx)
        # One candidate set for the whole batch: a superset of every row's own.
        candidates = (approx >= threshold[:, None]).any(dim=0).nonzero().squeeze(-1)
        exact = nn.functional.linear(h, weight.index_select(0, candidates).float())
        out = torch.full_like(approx, float("-inf"))
        out[:, candidates] = exact
        return out.reshape(*shape[:-1], self.vocab_size)


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


@dataclass
class FastReport:
    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # transform -> why
    compile_seconds: float | None = None

    def __str__(self) -> str:
        parts = self.applied + [f"no {k} ({v})" for k, v in self.skipped.items()]
        if self.compile_seconds is not None:
            parts.append(f"compiled in {self.compile_seconds:.0f} s")
        return ", ".join(parts) or "nothing"


def make_fast(model: nn.Module, cfg: FastConfig | None = None, gguf_blocks: dict | None = None) -> FastReport:
    """Apply the transforms of ``cfg`` to a ``GPTModel`` in place, in eval mode.

    Call it last: after loading the weights and casting to the serving dtype
    and device. A transform that does not fit (no oneDNN, a GPU, a bf16 head
    for ``screened_head``) is skipped and says why in the returned report.

    ``gguf_blocks`` (from ``core.weights.gguf.read_gguf_blocks`` or a
    checkpoint's ``core.fast.gguf_matvec.load_blocks``): the quantized blocks the
    model's weights were read from; the layers they hold then decode from them
    (``core.fast.gguf_matvec``), and the other transforms apply to the rest.
    """
    cfg = cfg or FastConfig()
    report = FastReport()
    model.eval()
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise FastPathError("make_fast: this model is already compiled; call make_fast once, on the plain model")
    if gguf_blocks:
        _use_gguf_blocks(model, gguf_blocks, report)
    weight = model.head_weight
    panels = _panels_fit(model, cfg, report)
    if cfg.screened_head and model.argmax_head is not None:
        report.skipped["screened_head"] = "the output layer decodes from GGUF blocks"
    elif cfg.screened_head:
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_available(torch.bfloat16):
            model.argmax_head = ScreenedHead(weight, cfg.batch_hint, panels=panels)
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
        if model.fast_head is None:
            model.fast_head = PackedHead(cfg.batch_hint, onednn, Panels() if panels else None)
            packed.append("the output layer")
        for name, used in (("prepack", onednn), ("panels", panels)):
            if used and packed:
                report.applied.append(f"{name} ({' and '.join(packed)})")
    if cfg.fused_ops:
        _use_fused_ops(model, cfg, report)
    if cfg.fused_layers and weight.dtype == torch.float32 and weight.device.type == "cpu" and not cfg.compile:
        _use_fused_layers(model, report)
    if cfg.speculative:
        _use_draft(model, report)
    if cfg.cuda_graphs and weight.device.type == "cuda":
        _use_cuda_graphs(model, cfg, report)
    if cfg.compile:
        report.compile_seconds = compile_model(model, cfg.batch_hint)
        report.applied.append("compile")
    return report


def fast_for_serving(checkpoint) -> FastReport | None:
    """The fast path the service and the CLI decode with, applied to a loaded causal-LM checkpoint.

    On the CPU: a checkpoint that carries GGUF blocks decodes from them in fp32
    (``core.fast.gguf_matvec``: the same weights in a fifth of the bytes); any other
    fp32 or bf16 model takes :func:`make_fast`'s defaults (panels, the screened
    output layer, oneDNN copies where they pay). On a CUDA GPU, in any dtype:
    decoding steps replayed from CUDA graphs. None when nothing applies (fp16
    on the CPU, other devices). A damaged blocks file raises ValueError.
    """
    model = checkpoint.model
    weight = model.head_weight
    if weight.device.type == "cuda":
        cpu_only = ("prepack", "panels", "screened_head", "fused_ops", "fused_layers", "speculative")
        return make_fast(model, FastConfig(**dict.fromkeys(cpu_only, False)))
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    from core.weights.gguf import checkpoint_blocks

    blocks = checkpoint_blocks(checkpoint.path, checkpoint.metadata) if weight.dtype == torch.float32 else {}
    if blocks:
        # Every layer decodes from its blocks: packed copies would hold the weights twice more for nothing.
        return make_fast(model, FastConfig(prepack=False, panels=False, screened_head=False), gguf_blocks=blocks)
    return make_fast(model, FastConfig())


def _panels_fit(model: nn.Module, cfg: FastConfig, report: FastReport) -> bool:
    """Whether decoding's linear layers can read panels (``core.fast.panels``); if not, why is reported."""
    weight = model.head_weight
    if not cfg.panels:
        return False
    if model.fast_head is not None and not any(type(m) is nn.Linear for m in model.modules()):
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


def _use_gguf_blocks(model: nn.Module, blocks: dict, report: FastReport) -> None:
    from core.fast.gguf_matvec import attach_gguf_blocks

    try:
        skipped = attach_gguf_blocks(model, blocks)
    except FastPathError as err:
        report.skipped["gguf_blocks"] = str(err)
        return
    types = sorted({t for t, _ in blocks.values()})
    report.applied.append(f"gguf_blocks ({len(blocks) - len(skipped)} of {len(blocks)} weights, {'/'.join(types)})")
    if skipped:
        report.skipped["gguf_blocks for"] = "; ".join(skipped[:3]) + (f"; {len(skipped) - 3} more" if len(skipped) > 3 else "")


def _use_fused_ops(model: nn.Module, cfg: FastConfig, report: FastReport) -> None:
    from core.fast.fused_ops import fusable, use_fused_ops

    weight = model.head_weight
    if not any(fusable(model)):
        return
    if cfg.compile:
        report.skipped["fused_ops"] = "inductor fuses these operations in the compiled model"
    elif weight.device.type != "cpu" or weight.dtype != torch.float32:
        dtype = str(weight.dtype).removeprefix("torch.")
        report.skipped["fused_ops"] = f"the kernels are fp32 CPU only, this model is {dtype} on {weight.device.type}"
    else:
        try:
            count = use_fused_ops(model)
        except FastPathError as err:
            report.skipped["fused_ops"] = str(err)
            return
        if count:
            report.applied.append(f"fused_ops ({count} RMSNorms and rotary embeddings)")


def _use_fused_layers(model: nn.Module, report: FastReport) -> None:
    from core.fast.fused_layers import fusable, use_fused_layers

    if not any(fusable(block) for block in model.blocks):
        return  # no layer has its weights as panels or GGUF blocks
    try:
        count = use_fused_layers(model)
    except FastPathError as err:
        report.skipped["fused_layers"] = str(err)
        return
    report.applied.append(f"fused_layers ({count} layers, one kernel call each when decoding)")


def _use_draft(model: nn.Module, report: FastReport) -> None:
    from core.fast.speculative import SelfDraft, drafts_for

    if not drafts_for(model):
        if model.head_weight.dtype == torch.float32 and model.pos_emb is not None:
            report.skipped["speculative"] = "the draft decodes through fused GPT-2 layers, and this model has none"
        return  # a half-precision model has nothing cheaper to draft with; Llama layers have no draft yet
    model.draft = SelfDraft(model)
    report.applied.append(
        f"speculative (one sequence: int8 drafts of up to {model.draft.max_draft} tokens, checked in fp32)")


def _use_cuda_graphs(model: nn.Module, cfg: FastConfig, report: FastReport) -> None:
    from core.fast.cuda_graphs import GraphedDecoder

    if cfg.compile:
        report.skipped["cuda_graphs"] = "the compiled model's shapes change with the cache"
        return
    model.decode_graphs = GraphedDecoder(model)
    report.applied.append("cuda_graphs (decoding steps replayed, one graph per batch size and cache length)")


def inductor_cache_dir() -> Path:
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", cache_dir() / "inductor"))


def compile_model(model: nn.Module, batch_hint: int = 1) -> float:
    """``torch.compile`` the model's forward with freezing, in place, and warm it up; returns seconds.

    Shapes are dynamic from the start (prompt length, cache length and batch
    all vary between requests), so the warm-up compiles each graph the decoding
    loop uses once: prefill and decode, unpadded and left-padded.
    """
    from core.generation.generate import GenerationConfig, decode_steps  # here: core.generation.generate imports the model

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
    start = time.perf_counter()
    model.compile(dynamic=True, options={"freezing": True})
    warm = GenerationConfig(max_new_tokens=3)
    rows = max(2, batch_hint)
    for prompts in ([[1] * 5] * rows, [[1] * 6] + [[1] * 4] * (rows - 1)):
        for _ in decode_steps(model, prompts, warm):
            pass
    return time.perf_counter() - start
