"""The transformer: GPT-2 (Radford et al., 2019) and Llama (Touvron et al., 2023).

Read in this order: ``config`` (the numbers), ``layers`` (norms, feed-forward,
rotary tables), ``attention`` (causal multi-head attention, explicit and SDPA),
``kv_cache`` (keys and values kept for decoding), ``gpt`` (blocks and the whole
model), ``loss`` (next-token cross-entropy without materialising the logits).
The book's chapters 3 and 4. Imports only torch and itself.
"""

from core.model.config import ConfigError, ModelConfig
from core.model.kv_cache import KVCache
from core.model.gpt import ForwardContext, GPTModel, TransformerBlock

__all__ = ["ConfigError", "ForwardContext", "GPTModel", "KVCache", "ModelConfig", "TransformerBlock"]
