"""A preallocated key/value cache for incremental decoding.

Without a cache, generating token t recomputes keys and values for all t-1
earlier tokens. The cache keeps them, so each decode step only runs the new
token through the model. Buffers are allocated once at the full length, so
decoding never reallocates or concatenates (``torch.cat`` per step would copy
the whole cache every token).
"""

from __future__ import annotations

import copy

import torch

from core.model.config import ModelConfig


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = max_len or cfg.context_length
        shape = (cfg.n_layers, batch_size, cfg.kv_heads, self.max_len, cfg.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens stored so far (the same for every layer)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, kv_heads, T, head_dim) keys/values; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Called by the model once all layers have stored n new positions."""
        self.length += n

    def reset(self) -> None:
        self.length = 0

    def resized(self, max_len: int, length: int | None = None) -> "KVCache":
        """A cache of ``max_len`` positions holding a copy of this one's first ``length`` (all it holds)."""
        length = self.length if length is None else length
        if not 0 <= length <= self.length or max_len < length:
            raise ValueError(f"a cache of {max_len} positions cannot hold {length} of {self.length} tokens")
        new = copy.copy(self)
        shape = (*self.keys.shape[:3], max_len, self.keys.shape[4])
        new.keys, new.values = self.keys.new_empty(shape), self.values.new_empty(shape)  # read only up to length
        new.keys[:, :, :, :length] = self.keys[:, :, :, :length]
        new.values[:, :, :, :length] = self.values[:, :, :, :length]
        new.max_len, new.length = max_len, length
        return new
