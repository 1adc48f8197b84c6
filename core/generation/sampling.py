"""Choosing the next token from logits (the book's chapter 5.3).

Greedy decoding takes the argmax. Sampling divides the logits by a
temperature, optionally keeps only the k most likely tokens (top-k; Fan et
al., 2018) or the smallest set whose probability reaches p (nucleus / top-p;
Holtzman et al., 2020), and draws from what is left.

Before either, penalties can push the model away from repeating itself: the
repetition penalty of CTRL (Keskar et al., 2019) over every token already in
the sequence, and OpenAI's frequency and presence penalties over the tokens
generated so far (:class:`Penalties`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    repetition_penalty: float = 1.0  # > 1 discourages any token already in the sequence; 1 is off
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated; -2 to 2, 0 is off
    presence_penalty: float = 0.0  # subtracted once a token has been generated at all; -2 to 2, 0 is off

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:  # also refuses nan
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:  # OpenAI's range; also refuses nan
                raise ValueError(f"{name} must be in [-2, 2], got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether a penalty changes the logits (so they depend on the sequence so far, not only the model)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


class Penalties:
    """What each row has seen and generated, and the penalties of ``cfg`` applied to its next logits.

    - repetition (CTRL, Keskar et al., 2019; as Hugging Face applies it): a token anywhere in the
      row so far, prompt included, has a positive logit divided by the penalty and a negative one
      multiplied by it, so a penalty above 1 always makes it less likely;
    - frequency and presence (OpenAI's definition): ``logit[j] -= count[j] * frequency + (count[j] > 0)
      * presence``, counting only the tokens generated so far.
    """

    def __init__(self, cfg: SamplingConfig, prompts: list[list[int]], vocab_size: int,
                 device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            self.seen[row, torch.tensor(prompt, dtype=torch.long, device=device)] = True
        self.counts = torch.zeros(len(prompts), vocab_size, device=device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The (B, V) logits of the next tokens with the penalties applied."""
        cfg = self.cfg
        logits = logits.float()
        if cfg.repetition_penalty != 1.0:
            scaled = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
            logits = torch.where(self.seen, scaled, logits)
        if cfg.frequency_penalty or cfg.presence_penalty:
            logits = logits - self.counts * cfg.frequency_penalty - (self.counts > 0).float() * cfg.presence_penalty
        return logits

    def update(self, tokens: torch.Tensor) -> None:
        """Record each row's new token (B,)."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        self.seen[rows, tokens] = True
        self.counts[rows, tokens] += 1


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k and top-p applied to (B, V) logits; removed entries become -inf."""
    logits = logits.float() / max(cfg.temperature, 1e-8)
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        # Only tokens still in the running need sorting: after top-k about k of them, far
        # fewer than the whole vocabulary (timings: docs/performance.md, "Speculative decoding").
        n = int(torch.isfinite(logits).sum(-1).max()) if cfg.top_k is not None else logits.shape[-1]
        if n < logits.shape[-1]:
            sorted_logits, order = torch.topk(logits, max(n, 1), dim=-1)  # descending
        else:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p; the most
        # likely token always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= cfg.top_p
        drop_sorted[..., 0] = False  # even a top_p that rounds to 0 in float32 keeps one token
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token_probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution sampling draws from, (B, V); greedy puts all mass on the argmax."""
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return filter_logits(logits, cfg).softmax(-1)


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from the last-position logits (B, V)."""
    if cfg.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, cfg).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(cfg: SamplingConfig, device: torch.device | str) -> torch.Generator | None:
    if cfg.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    return generator
