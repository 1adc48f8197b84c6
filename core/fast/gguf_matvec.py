"""Decoding straight from GGUF's quantized blocks: the same weights, a fifth of the bytes.

A GGUF file stores most of a model's weights block-quantized (SmolLM2-135M's
linear layers as Q4_1, its embedding as Q8_0). ``core.weights.gguf`` turns them
into fp32 for our model, and a decoding step then streams 4 bytes per weight.
The quantized blocks describe exactly the same numbers in 5 bits (Q4_1) or
8.5 bits (Q8_0) per weight, so a matrix-vector product that reads the blocks and
dequantizes in registers reads 4-6x fewer bytes for the *same* weights: this is
how llama.cpp's ggml decodes, and since batch-1 decoding is bound by memory
bandwidth (Pope et al., 2022), it is where the time goes.

The kernel (``core/fast/csrc/gguf_matvec.cpp``) uses the weights gguf's own
dequantizer produces (for a one-hot input its output is exactly those weights)
and differs from the dense fp32 product only in fp32 rounding, as any other
summation order would. Its model-side wrappers keep the dense fp32 parameters
untouched beside the blocks and use the blocks only for what they are good at:
a few rows of fp32 activations on the CPU, no autograd, and weights still equal
to the ones the blocks came from. Anything else (prefill of a long prompt,
training, a fine-tuned weight, another dtype or device) takes the plain
``F.linear``.

The C++ is compiled on first use (``core.fast.kernels``); :func:`kernels` raises
:class:`~core.fast.kernels.FastPathError` saying why when it cannot be (no C++
compiler, no AVX-512).
"""

from __future__ import annotations


import torch
from torch import nn

from core.fast.kernels import load_kernels, needs_autograd, weight_key
from core.weights.gguf import BLOCK_BYTES, Blocks

BLOCK = 32  # weights per GGUF block
MAX_ROWS = 8  # rows of x one kernel call takes (kMaxRows in the C++)


def kernels():
    """The compiled GGUF kernels (``q4_1``, ``q8_0``); raises FastPathError saying why they cannot be had."""
    return load_kernels("gguf_matvec")


class BlockMatrix:
    """A weight matrix (out, in) held as GGUF blocks, split into the streams the kernel reads:
    the integers ``qs``, the fp16 scales ``d`` and, for Q4_1, the fp16 offsets ``m``."""

    def __init__(self, gguf_type: str, data: torch.Tensor, in_features: int) -> None:
        if gguf_type not in BLOCK_BYTES:
            raise ValueError(f"GGUF type {gguf_type} has no kernel (only {', '.join(BLOCK_BYTES)})")
        row_bytes = in_features // BLOCK * BLOCK_BYTES[gguf_type]
        if data.dtype != torch.uint8 or data.dim() != 2 or in_features % BLOCK or data.shape[1] != row_bytes:
            raise ValueError(f"{tuple(data.shape)} {data.dtype} is not {gguf_type} rows of {in_features} weights")
        self.gguf_type, self.in_features, self.out_features = gguf_type, in_features, data.shape[0]
        blocks = data.view(self.out_features, in_features // BLOCK, BLOCK_BYTES[gguf_type])

        def field(start: int, stop: int) -> torch.Tensor:
            return blocks[:, :, start:stop].contiguous()

        def halves(start: int) -> torch.Tensor:
            return field(start, start + 2).view(torch.float16)[..., 0]

        # Q4_1: fp16 d, fp16 m, 16 bytes of nibbles. Q8_0: fp16 d, 32 int8.
        self.d = halves(0)
        self.m = halves(2) if gguf_type == "Q4_1" else None
        self.qs = field(4 if self.m is not None else 2, BLOCK_BYTES[gguf_type]).view(self.out_features, -1)
        self._kernel = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) fp32 with at most ``MAX_ROWS`` rows -> x @ W.T (..., out)."""
        if self._kernel is None:  # looked up once: matvec runs for every layer of every decoding step
            self._kernel = getattr(kernels(), self.gguf_type.lower())
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        return self._kernel(rows, self.qs, self.d, self.m).view(*x.shape[:-1], self.out_features)


class _BlockWeight:
    """The blocks of one weight, and the dense weight they were checked against."""

    def __init__(self, matrix: BlockMatrix, weight: torch.Tensor) -> None:
        self.matrix, self.key = matrix, weight_key(weight)

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        # Few rows (the kernel reads the weights once per call whatever the rows, so
        # a long prefill is better served by the dense matrix product), fp32, CPU,
        # inference, and the weight still the one the blocks were checked against.
        return (
            x.numel() <= MAX_ROWS * x.shape[-1] and x.dtype == torch.float32 and x.device.type == "cpu"
            and not needs_autograd(x, weight)
            and weight_key(weight) == self.key
        )


class GGUFLinear(nn.Module):
    """An ``nn.Linear`` that decodes from its weight's GGUF blocks; parameters and names unchanged."""

    def __init__(self, linear: nn.Linear, matrix: BlockMatrix) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._blocks = _BlockWeight(matrix, self.weight)  # a plain attribute: never saved, never cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._blocks.applies(x, self.weight):
            return nn.functional.linear(x, self.weight, self.bias)
        out = self._blocks.matrix.matvec(x)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        kind = self._blocks.matrix.gguf_type
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind} blocks"


class GGUFHead(nn.Module):
    """The output layer ``hidden @ weight.T`` (weight passed in: possibly the tied embedding) from GGUF blocks."""

    def __init__(self, matrix: BlockMatrix, weight: torch.Tensor) -> None:
        super().__init__()
        self._blocks = _BlockWeight(matrix, weight)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self._blocks.applies(hidden, weight):
            return nn.functional.linear(hidden, weight)
        return self._blocks.matrix.matvec(hidden)


def _agrees(matrix: BlockMatrix, weight: torch.Tensor) -> bool:
    """Whether the blocks hold ``weight``: one product with a random vector, against the dense one.

    A different weight (fine-tuned, another file) is off by far more than the
    rounding differences of equal weights."""
    if (matrix.out_features, matrix.in_features) != tuple(weight.shape):
        return False
    x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, dense = matrix.matvec(x), nn.functional.linear(x, weight.detach())
    return bool(torch.allclose(ours, dense, rtol=1e-4, atol=1e-5 * float(dense.abs().max()) + 1e-6))


def attach_gguf_blocks(model: nn.Module, blocks: Blocks) -> tuple[list[str], GGUFHead | None]:
    """Let ``model`` (a ``GPTModel`` in fp32 on the CPU) decode from ``blocks``; returns what was skipped, and
    why, and the output layer as a :class:`GGUFHead` for a serving decoder (None if its blocks were not given).

    ``blocks`` maps our parameter names (``blocks.0.attn.qkv.weight``, ``tok_emb.weight``
    for a tied output layer, ...) to GGUF blocks. Each weight is checked against
    its blocks first; one that does not agree keeps the dense path.
    """
    kernels()  # fail at once, with the reason, if the kernels cannot be had
    skipped, head = [], None
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
        try:
            matrix = BlockMatrix(gguf_type, data, weight.shape[1])
        except ValueError as err:
            skipped.append(f"{name} ({err})")
            continue
        if not _agrees(matrix, weight):
            skipped.append(f"{name} (the weight is not the one the blocks hold)")
            continue
        if name == head_name:
            head = GGUFHead(matrix, weight)
        else:
            parent, attr, linear = linears[name]
            setattr(parent, attr, GGUFLinear(linear, matrix))
    return skipped, head
