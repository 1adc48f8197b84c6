"""What a server runs: the engine that decodes many sequences at once.

``engine`` schedules every request's decoding step by step (continuous
batching): each step admits waiting sequences, prefills their prompts in
chunks, decodes one token for every running sequence in one batched pass, and
retires those that finished or were cancelled.

It may import ``core.model``, ``core.generation``, ``core.tokenizer`` and
``core.fast``; only the service (``app``) and the command line import it. No
web imports: the service wraps it.
"""

from core.serving.engine import Engine, EngineError, EngineFull, EngineStats, EngineStopped, Handle, Queued

__all__ = ["Engine", "EngineError", "EngineFull", "EngineStats", "EngineStopped", "Handle", "Queued"]
