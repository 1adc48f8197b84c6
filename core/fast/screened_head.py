"""The screened output layer (``make_fast``'s ``screened_head``): the exact argmax of an fp32
output layer from a bf16 screen and an fp32 check of the few rows that can still win."""

from __future__ import annotations

import torch
from torch import nn

from core.fast.kernels import FastPathError, weight_key
from core.fast.packed import pack_weight, packed_linear, onednn_available
from core.fast.panels import Panels

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
        self.panels = Panels(torch.bfloat16) if panels else None  # plain attribute: never saved, never cast
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
        if self.panels is not None and self.panels.applies(h_bf16, weight):
            return self.panels.linear(h_bf16, weight).float()
        if self._screen is None:
            self._screen = pack_weight(weight.detach().to(torch.bfloat16), self.batch_hint)
        return packed_linear(h_bf16, self._screen, None).float()

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
        if hidden.numel() == shape[-1] and self.panels is None:
            # One row: MKL's fp32 matrix-vector product streams the whole head about as fast
            # as oneDNN's bf16 kernel streams the half-size screen (docs/performance.md), so
            # screening saves nothing and its extra passes cost a little. The panel kernel
            # streams the screen at full speed, so with it one row is screened too.
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
