"""The small layers a transformer block is made of.

GPT-2 uses LayerNorm (Ba et al., 2016), a GELU MLP and learned positions;
Llama swaps in RMSNorm (Zhang & Sennrich, 2019), the SwiGLU feed-forward
(Shazeer, 2020) and rotary position embeddings (Su et al., 2021). The book
builds each of these by hand in chapter 4 and its Llama bonus chapter; so do we.
The original Transformer's fixed sinusoidal positions (Vaswani et al., 2017)
are here too, as the alternative to GPT-2's learned table.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.model.config import ModelConfig


class LayerNorm(nn.Module):
    """Normalise each vector to zero mean and unit variance, then scale and shift."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Scale by the root mean square only: no mean subtraction, no bias.

        rmsnorm(x) = weight * x / sqrt(mean(x^2) + eps)

    ``formula`` writes it out; ``forward`` uses torch's ``rms_norm``, the same
    computation in one call instead of five (it matters in a 30-layer model's
    decoding step; the tests check they agree).
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def formula(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: the mean of squares loses too much precision in bf16.
        normed = nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class GELU(nn.Module):
    """GELU with the tanh approximation that GPT-2 was trained with:

        gelu(x) = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))

    ``formula`` spells that out in tensor ops, as the book does; ``forward`` asks
    torch for the same function as one fused kernel (eight passes over the
    activations become one; the results agree to float rounding, see the tests).
    """

    @staticmethod
    def formula(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """GPT-2's position-wise MLP: expand, GELU, project back."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, cfg.ff_dim)
        self.act = GELU()
        self.proj = nn.Linear(cfg.ff_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class SwiGLU(nn.Module):
    """Llama's gated feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.emb_dim, cfg.ff_dim, bias=False)
        self.up = nn.Linear(cfg.emb_dim, cfg.ff_dim, bias=False)
        self.down = nn.Linear(cfg.ff_dim, cfg.emb_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def make_norm(cfg: ModelConfig) -> nn.Module:
    return LayerNorm(cfg.emb_dim, cfg.norm_eps) if cfg.family == "gpt2" else RMSNorm(cfg.emb_dim, cfg.norm_eps)


def make_feed_forward(cfg: ModelConfig) -> nn.Module:
    return FeedForward(cfg) if cfg.family == "gpt2" else SwiGLU(cfg)


def sinusoidal_table(context_length: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed position encodings of Vaswani et al. (2017), section 3.5, shape (context_length, dim):

        PE(pos, 2i)     = sin(pos / base^(2i / dim))
        PE(pos, 2i + 1) = cos(pos / base^(2i / dim))

    Each pair of columns is a clock turning at its own speed, from one turn per
    2 pi positions down to one per 2 pi * base, so every position gets a distinct
    pattern and a fixed offset is the same rotation wherever it starts.
    """
    # float64 angles: at position 1000 float32 loses the third decimal of sin().
    positions = torch.arange(context_length, dtype=torch.float64)[:, None]
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions * inv_freq  # (context_length, ceil(dim / 2))
    table = torch.empty(context_length, dim, dtype=torch.float64)
    table[:, 0::2] = angles.sin()
    table[:, 1::2] = angles.cos()[:, : dim // 2]  # an odd dim ends on a sine
    return table.float()


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal position vectors, added to the token embeddings like GPT-2's learned table.

    The table is a buffer, not a parameter: nothing trains it. It is stored with
    the weights under the learned table's name (``pos_emb.weight``), so a
    checkpoint loads, and every reader of ``pos_emb.weight`` works, the same way
    for either encoding.
    """

    def __init__(self, context_length: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", sinusoidal_table(context_length, dim))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.weight[positions]


def make_position_embedding(cfg: ModelConfig) -> nn.Module | None:
    """What the model adds to its token embeddings for position; None when attention rotates instead (rotary)."""
    if cfg.pos_encoding == "learned":
        return nn.Embedding(cfg.context_length, cfg.emb_dim)
    if cfg.pos_encoding == "sinusoidal":
        return SinusoidalPositions(cfg.context_length, cfg.emb_dim)
    return None


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (context_length, head_dim) for rotary embeddings.

    Frequencies follow Su et al. (2021): pair i of a head turns at theta^(-2i/d).
    We use the "rotate half" layout (pairs are (i, i + d/2)) that Hugging Face's
    Llama uses, so its Q/K weights load without reordering.
    """
    head_dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    scaling = cfg.extra.get("rope_scaling")
    if scaling:
        inv_freq = llama3_scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(cfg.context_length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def llama3_scaled_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's context extension (Meta, 2024): slow down the low frequencies.

    Wavelengths longer than the original context / low_freq_factor are divided
    by ``factor``; shorter than original / high_freq_factor are kept; those in
    between are interpolated, so the model sees familiar rotations at short
    range and stretched ones at long range.
    """
    if scaling.get("rope_type", "llama3") != "llama3":
        raise ValueError(f"unsupported rope scaling {scaling.get('rope_type')!r}; only llama3 is implemented")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    between = (wavelength <= original / low) & (wavelength >= original / high)
    return torch.where(between, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dimension of x, e.g. (B, heads, T, head_dim), by per-position angles.

    cos and sin are gathered at each token's position and broadcast against x:
    (B, 1, T, head_dim) for that layout, (B, T, 1, head_dim) for (B, T, heads, head_dim).
    """
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
