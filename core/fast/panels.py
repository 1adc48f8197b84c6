"""The linear layers of a decoding step from column panels: every weight read once, at full speed.

A decoding step multiplies each weight matrix by one row of activations per
sequence, one to eight rows. That product reads the whole matrix and does
little arithmetic with it, so its speed is the speed at which the weights
stream from memory (Pope et al., 2022). torch's CPU kernels are tuned for
large matrix products and read small-batch weights well below the machine's
read bandwidth, MKL's fp32 matrix-vector product and oneDNN's packed kernels
alike (figures in docs/performance.md).

``core/fast/csrc/panel_linear.cpp`` reads a weight stored as panels of 16 output
columns, ``(N / 16, K, 16)``: each panel is one contiguous stream with one
cache line per input column, several panels stream at once, and each cache
line is multiplied with every row of activations while it is in a register.
That is the layout of a GEMM micro-kernel (Goto and van de Geijn, 2008) cut
to decoding's few rows. It reads fp32 or bf16 weights and sums in fp32, so an
fp32 layer gives the fp32 product up to summation order and a bf16 layer what
torch's bf16 kernels give (and int8 copies with a scale per column, for the
draft of ``core.fast.speculative``). bf16 panels pair consecutive inputs in each cache
line, which makes widening them to fp32 in registers two instructions per 32
weights instead of four.

:class:`Panels` holds one weight's panel copy beside the parameter, which stays
as it is (state-dict names and values unchanged); the copy is rebuilt if the
weight is changed or cast. ``core.fast.transforms.make_fast`` attaches panels to a
model's linear layers and output layer; anything the kernel does not take
(more than eight rows, autograd, another device or dtype) keeps the other
paths. The C++ is compiled on first use (``core.fast.kernels``).
"""

from __future__ import annotations

import torch

from core.fast.kernels import load_kernels, needs_autograd, weight_key

MAX_ROWS = 8  # rows of activations one kernel call takes (kMaxRows in the C++)
WIDTH = 16  # output columns per panel: one AVX-512 register of fp32
DTYPES = (torch.float32, torch.bfloat16)  # the weights (and activations) the kernel takes


def kernels():
    """The compiled ``linear``; raises FastPathError saying why it cannot be had."""
    return load_kernels("panel_linear")


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) -> panels (ceil(N / 16), K, 16), ``panels[p, k, j] = weight[16 p + j, k]``, zero-padded.

    In bf16 each pair of consecutive k shares a cache line, interleaved per column
    (element ``(k // 2, j, k % 2)`` of the panel), which is cheaper to widen to fp32;
    K must then be even. int8 keeps the fp32 layout."""
    n, k = weight.shape
    padded = -(-n // WIDTH) * WIDTH
    if padded != n:
        weight = torch.cat([weight, weight.new_zeros(padded - n, k)])
    panels = weight.reshape(padded // WIDTH, WIDTH, k)
    if weight.dtype != torch.bfloat16:
        return panels.transpose(1, 2).contiguous()
    if k % 2:
        raise ValueError(f"bf16 panels pair their inputs: in_features must be even, got {k}")
    pairs = panels.reshape(padded // WIDTH, WIDTH, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return pairs.view(padded // WIDTH, k, WIDTH)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) -> (q int8 (N, K), scales fp32 (N,)) with weight ~ q * scales[:, None]:
    symmetric, one scale per output row, the largest magnitude mapped to 127 (absmax
    quantization, as in Dettmers et al., 2022, per row)."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales


class Panels:
    """The panel copy of one weight, rebuilt when the weight is changed in place, replaced or cast.

    ``dtype``: the dtype the panels are kept in (default: the weight's own);
    the screened output layer keeps a bf16 copy of an fp32 head, and
    ``core.fast.speculative``'s draft an int8 copy (:func:`quantize_int8`; fp32
    activations, the scales applied to the fp32 sums).
    """

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self._kernel = kernels().linear  # fail here, with the reason, rather than on the first step
        self.panels: list[torch.Tensor] | None = None
        self.key: tuple | None = None

    def of(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """The weight as the kernels take it: ``[panels]``, or ``[panels, scales]`` in int8."""
        key = weight_key(weight)
        if key != self.key:
            if self.dtype == torch.int8:
                q, scales = quantize_int8(weight)
                padded = scales.new_zeros(-(-len(scales) // WIDTH) * WIDTH)
                padded[: len(scales)] = scales
                self.panels = [to_panels(q), padded]
            else:
                self.panels = [to_panels(weight.detach().to(self.dtype or weight.dtype))]
            self.key = key
        return self.panels

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether the kernel takes ``x @ weight.T``: at most eight rows, CPU, inference, a
        weight dtype it reads and activations in the panels' dtype (fp32 for int8 panels).
        Checked on every call of every layer, so kept to a few attribute reads."""
        int8 = self.dtype == torch.int8
        return (
            x.numel() <= MAX_ROWS * x.shape[-1] and x.device.type == "cpu"
            and x.dtype == (torch.float32 if int8 else self.dtype or weight.dtype) and weight.dtype in DTYPES
            and x.shape[-1] % (4 if int8 else 2 if x.dtype == torch.bfloat16 else 1) == 0  # k read in pairs, fours
            and not needs_autograd(x, weight)
        )

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) with at most eight rows -> x @ weight.T + bias (..., N), in x's dtype."""
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = self._kernel(rows, self.of(weight), bias, weight.shape[0])
        return out.view(*x.shape[:-1], weight.shape[0])

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickling) rebuilds its panels on first use and looks the kernel up again.
        return {"dtype": self.dtype}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["dtype"])
