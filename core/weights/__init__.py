"""Weights in and out: our checkpoint format (``checkpoint``), the converters
from Hugging Face (``hf``), GGUF (``gguf``) and OpenAI's TensorFlow GPT-2
(``openai_tf``) names to ours, and obtaining published models: what can be had
(``catalogue``), getting the files (``fetch``), turning them into checkpoints
(``convert``), and ``download``, which ties the three together.

Imports ``core.model``, ``core.generation`` (chat templates), ``core.tokenizer``,
``core.classifier`` and ``core.paths``; never ``core.fast``.
"""
