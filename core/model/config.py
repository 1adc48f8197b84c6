"""Model configuration: one dataclass for both model families.

GPT-2 (Radford et al., 2019; the book's chapter 4) and Llama (Touvron et al.,
2023; the book's bonus chapter that converts GPT to Llama) differ only in
which normalisation, position encoding and feed-forward they use, so one set
of numbers plus a ``family`` field describes either. ``pos_encoding`` lets a
GPT-2 swap its learned position table for the original Transformer's fixed
sinusoids (Vaswani et al., 2017), to compare the two on the same model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("gpt2", "llama")
# Which position encodings each family can run: rotary positions live inside
# attention (core.model.attention and the fused Llama kernels), learned and
# sinusoidal ones are added to the token embeddings, which is GPT-2's layout.
POS_ENCODINGS = {"gpt2": ("learned", "sinusoidal"), "llama": ("rotary",)}


class ConfigError(ValueError):
    """A model configuration that cannot be built (unknown preset, bad key, bad value)."""


@dataclass
class ModelConfig:
    family: str = "gpt2"
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    # Grouped-query attention (Ainslie et al., 2023): fewer key/value heads than
    # query heads. None means one key/value head per query head.
    n_kv_heads: int | None = None
    # Width of the feed-forward layer; None means GPT-2's 4 * emb_dim.
    hidden_dim: int | None = None
    drop_rate: float = 0.0
    qkv_bias: bool = False
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # "learned" (GPT-2), "sinusoidal" (Vaswani et al., 2017) or "rotary" (Llama);
    # None means the family's own, so configs written before this key still load.
    pos_encoding: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown model family {self.family!r}; expected one of {', '.join(FAMILIES)}")
        for name in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads:
            raise ConfigError(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        allowed = POS_ENCODINGS[self.family]
        if self.pos_encoding is None:
            self.pos_encoding = allowed[0]
        elif self.pos_encoding not in allowed:
            raise ConfigError(
                f"pos_encoding {self.pos_encoding!r} is not available for the {self.family} family; "
                f"choose {' or '.join(allowed)}"
            )

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.hidden_dim or 4 * self.emb_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


# GPT-2 sizes as OpenAI released them (124M, 355M, 774M, 1558M parameters with
# the output head tied to the token embedding). OpenAI's weights use biases in
# the QKV projection; the book's chapter 5 run from scratch leaves them out.
_GPT2 = dict(family="gpt2", vocab_size=50257, context_length=1024, qkv_bias=True, tie_embeddings=True)
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": {**_GPT2, "emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium": {**_GPT2, "emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large": {**_GPT2, "emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl": {**_GPT2, "emb_dim": 1600, "n_layers": 48, "n_heads": 25},
    # SmolLM2-135M (Hugging Face, 2024), a Llama-architecture model.
    "smollm2-135m": dict(
        family="llama", vocab_size=49152, context_length=8192, emb_dim=576, n_layers=30, n_heads=9,
        n_kv_heads=3, hidden_dim=1536, qkv_bias=False, tie_embeddings=True, norm_eps=1e-5, rope_theta=100000.0,
    ),
}
PRESET_ALIASES = {"124M": "gpt2-small", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}
