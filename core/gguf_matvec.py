"""Decoding straight from GGUF's quantized blocks: the same weights, a fifth of the bytes.

A GGUF file stores most of a model's weights block-quantized (SmolLM2-135M's
linear layers as Q4_1, its embedding as Q8_0). ``core.gguf_weights`` turns them
into fp32 for our model, and a decoding step then streams 4 bytes per weight.
The quantized blocks describe exactly the same numbers in 5 bits (Q4_1) or
8.5 bits (Q8_0) per weight, so a matrix-vector product that reads the blocks and
dequantizes in registers reads 4-6x fewer bytes for the *same* weights: this is
how llama.cpp's ggml decodes, and since batch-1 decoding is bound by memory
bandwidth (Pope et al., 2022), it is where the time goes.

The kernel (``core/csrc/gguf_matvec.cpp``) rebuilds each weight as gguf's own
dequantizer does, bit for bit (see the comment there), so its products differ
from the dense fp32 ones only in summation order. Its model-side wrappers keep
the dense fp32 parameters untouched beside the blocks and use the blocks only
for what they are good at: a few rows of fp32 activations on the CPU, no
autograd, and weights still equal to the ones the blocks came from. Anything
else (prefill of a long prompt, training, a fine-tuned weight, another dtype or
device) takes the plain ``F.linear``.

The C++ is compiled once per machine and torch version by
``torch.utils.cpp_extension`` under ``$SCRATCHGPT_HOME/extensions`` (about 30 s);
:func:`kernels` raises :class:`~core.fast.FastPathError` saying why when it
cannot be (no C++ compiler, no AVX-512).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from core.fast import FastPathError, weight_key

# GGUF tensor types the kernel reads, with the bytes of one 32-weight block.
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}
BLOCK = 32
BLOCKS_FILE = "gguf_blocks.safetensors"
_SOURCE = Path(__file__).with_name("csrc") / "gguf_matvec.cpp"
logger = logging.getLogger(__name__)

Blocks = dict[str, tuple[str, torch.Tensor]]  # parameter name -> (GGUF type, (out, bytes per row) uint8)


def extensions_dir() -> Path:
    from core.download import cache_dir

    return cache_dir() / "extensions" / f"torch-{torch.__version__.replace('+', '-')}"


@functools.cache
def kernels():
    """The compiled kernel module (``q4_1``, ``q8_0``), built on first use and cached on disk."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        raise FastPathError(f"the GGUF kernels need AVX-512; this CPU offers {torch.backends.cpu.get_cpu_capability()}")
    # torch builds with ninja: pip's ninja lives beside this interpreter, which may not be on PATH.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if shutil.which("ninja") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        raise FastPathError("the GGUF kernels are compiled on first use and need a C++ compiler and ninja on PATH")
    from torch.utils.cpp_extension import load

    build = extensions_dir() / "gguf_matvec"
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob("*.so")):
        logger.info("compiling the GGUF kernels into %s (once per machine, about 30 s)", build)
    flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mf16c", "-mfma", "-fopenmp"]
    try:
        return load(
            "scratchgpt_gguf_matvec", [str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
            build_directory=str(build), verbose=False,
        )
    except (RuntimeError, OSError) as err:  # a failed compile or link
        raise FastPathError(f"the GGUF kernels did not build: {str(err).strip().splitlines()[-1]}") from err


def check_blocks(gguf_type: str, data: torch.Tensor, in_features: int, name: str = "tensor") -> None:
    if gguf_type not in BLOCK_BYTES:
        raise ValueError(f"{name}: GGUF type {gguf_type} has no kernel (only {', '.join(BLOCK_BYTES)})")
    row_bytes = in_features // BLOCK * BLOCK_BYTES[gguf_type]
    if data.dtype != torch.uint8 or data.dim() != 2 or in_features % BLOCK or data.shape[1] != row_bytes:
        raise ValueError(f"{name}: {tuple(data.shape)} {data.dtype} is not {gguf_type} rows of {in_features} weights")


def block_matvec(x: torch.Tensor, gguf_type: str, data: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (..., K) fp32 with at most the kernel's ``max_rows`` rows -> x @ W.T (..., N) from W's blocks."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = getattr(kernels(), gguf_type.lower())(rows, data)
    return out.reshape(*x.shape[:-1], out_features)


class _BlockWeight:
    """The blocks of one weight, and the dense weight they were checked against."""

    def __init__(self, gguf_type: str, data: torch.Tensor, weight: torch.Tensor) -> None:
        self.gguf_type, self.data, self.key = gguf_type, data, weight_key(weight)

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        # Few rows (the kernel reads the weights once per call whatever the rows, so
        # a long prefill is better served by the dense matrix product), fp32, CPU,
        # inference, and the weight still the one the blocks were checked against.
        return (
            x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() <= kernels().max_rows * x.shape[-1]
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and weight_key(weight) == self.key
        )


class GGUFLinear(nn.Module):
    """An ``nn.Linear`` that decodes from its weight's GGUF blocks; parameters and names unchanged."""

    def __init__(self, linear: nn.Linear, gguf_type: str, data: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        check_blocks(gguf_type, data, self.in_features)
        self._blocks = _BlockWeight(gguf_type, data, self.weight)  # a plain attribute: never saved, never cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._blocks.applies(x, self.weight):
            return nn.functional.linear(x, self.weight, self.bias)
        out = block_matvec(x, self._blocks.gguf_type, self._blocks.data, self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._blocks.gguf_type} blocks"


class GGUFHead(nn.Module):
    """The output layer ``hidden @ weight.T`` (weight passed in: possibly the tied embedding) from GGUF blocks."""

    def __init__(self, gguf_type: str, data: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__()
        check_blocks(gguf_type, data, weight.shape[1], "output layer")
        self.out_features = weight.shape[0]
        self._blocks = _BlockWeight(gguf_type, data, weight)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self._blocks.applies(hidden, weight):
            return nn.functional.linear(hidden, weight)
        return block_matvec(hidden, self._blocks.gguf_type, self._blocks.data, self.out_features)


def _agrees(gguf_type: str, data: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the blocks hold ``weight``: one product with a random vector, against the dense one.

    A different weight (fine-tuned, another file) is off by far more than the
    summation-order differences of equal weights."""
    x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = block_matvec(x, gguf_type, data, weight.shape[0])
        dense = nn.functional.linear(x, weight.detach())
    return bool(torch.allclose(ours, dense, rtol=1e-4, atol=1e-5 * float(dense.abs().max()) + 1e-6))


def attach_gguf_blocks(model: nn.Module, blocks: Blocks) -> list[str]:
    """Let ``model`` (a ``GPTModel`` in fp32 on the CPU) decode from ``blocks``; returns what was skipped, and why.

    ``blocks`` maps our parameter names (``blocks.0.attn.qkv.weight``, ``tok_emb.weight``
    for a tied output layer, ...) to GGUF blocks. Each weight is checked against
    its blocks first; one that does not agree keeps the dense path.
    """
    kernels()  # fail at once, with the reason, if the kernels cannot be had
    skipped = []
    linears = {f"{name}.weight": (parent, attr, module)
               for parent_name, parent in model.named_modules()
               for attr, module in parent.named_children()
               for name in [f"{parent_name}.{attr}" if parent_name else attr]
               if type(module) is nn.Linear}
    head_name = "tok_emb.weight" if model.out_head is None else "out_head.weight"
    for name, (gguf_type, data) in blocks.items():
        if name == head_name:
            weight = model.head_weight
        elif name in linears:
            weight = linears[name][2].weight
        else:
            skipped.append(f"{name} (no such linear layer)")
            continue
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            skipped.append(f"{name} (the model is {weight.dtype} on {weight.device.type}, the kernels fp32 on the CPU)")
            continue
        check_blocks(gguf_type, data, weight.shape[1], name)
        if data.shape[0] != weight.shape[0] or not _agrees(gguf_type, data, weight):
            skipped.append(f"{name} (the weight is not the one the blocks hold)")
            continue
        if name == head_name:
            model.fast_head = model.argmax_head = GGUFHead(gguf_type, data, weight)
        else:
            parent, attr, linear = linears[name]
            setattr(parent, attr, GGUFLinear(linear, gguf_type, data))
    return skipped


# -- storing the blocks beside a checkpoint --------------------------------------------


def save_blocks(directory: Path, blocks: Blocks) -> None:
    """Write ``blocks`` into a checkpoint directory being built (``gguf_blocks.safetensors``)."""
    from safetensors.torch import save_file

    save_file({name: data.contiguous() for name, (_, data) in blocks.items()}, str(directory / BLOCKS_FILE),
              metadata={name: gguf_type for name, (gguf_type, _) in blocks.items()})


def load_blocks(directory: Path) -> Blocks:
    """The blocks a checkpoint directory carries; empty when it carries none."""
    from safetensors import safe_open

    path = Path(directory) / BLOCKS_FILE
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        types = f.metadata() or {}
        return {name: (types[name], f.get_tensor(name)) for name in f.keys()}


def checkpoint_blocks(directory: str | Path, metadata: dict | None = None) -> Blocks:
    """The GGUF blocks of a checkpoint: its own file, else (checkpoints converted before they
    kept one) those of the GGUF file it was converted from, if that is still there."""
    blocks = load_blocks(Path(directory))
    source = Path(str((metadata or {}).get("source", "")))
    if not blocks and source.suffix == ".gguf" and source.is_file():
        from core.gguf_weights import read_gguf_blocks

        blocks = read_gguf_blocks(source)
    return blocks
