"""A second tiny chat model for the tests of several chat models (test_chat_models, test_browser_models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SECOND = "tiny-chat-b"
# The second model's decoding defaults, as a fine-tuning job writes them into its checkpoint.
SECOND_DEFAULTS = {"temperature": 0.0, "top_k": None, "repetition_penalty": 1.3}


def tiny_chat(path: Path, tokenizer: Any, seed: int, metadata: dict[str, Any]) -> Path:
    """A randomly initialised tiny chat model (another seed answers differently), saved as the jobs save theirs."""
    from core.generation.chat_template import ALPACA
    from core.model import GPTModel
    from core.model.config import ModelConfig
    from core.weights.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = GPTModel(ModelConfig(context_length=256, vocab_size=50257, emb_dim=32, n_layers=2, n_heads=2))
    return save_checkpoint(path, model, tokenizer, chat_template=ALPACA, metadata=metadata)


def second_chat(path: Path, tokenizer: Any) -> Path:
    return tiny_chat(path, tokenizer, seed=7, metadata={"name": SECOND, "generation_defaults": SECOND_DEFAULTS})


def expected_answer(checkpoint: Path, system: str, turns: list[dict[str, str]], tokens: int, **sampling: Any) -> str:
    """What core generates from ``checkpoint`` itself: what the service must answer with that model."""
    from core.generation.generate import generate_text
    from core.weights.checkpoint import load_checkpoint

    from app.services.prompts import generation_config, plan_prompt

    ckpt = load_checkpoint(checkpoint)
    plan = plan_prompt(ckpt, system, turns, tokens)
    return generate_text(ckpt.model, ckpt.tokenizer, plan.prompt_ids,
                         generation_config(ckpt, max_new_tokens=tokens, **sampling))
