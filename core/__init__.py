"""scratchgpt's building blocks, in rooms; read them in this order.

1. ``core.model``: the transformer itself (config, layers, attention, KV cache,
   GPT-2 and Llama, the loss), the book's chapters 3 and 4.
2. ``core.generation``: sampling and the decoding loop (chapter 5), and chat templates.
3. ``core.tokenizer``: byte-level BPE from scratch beside tiktoken's, and the
   readers of other projects' tokenizer files (chapter 2).
4. ``core.weights``: checkpoints, loading GPT-2, Hugging Face, GGUF and OpenAI's
   TensorFlow weights, and downloading them.
5. ``core.data``, ``core.classifier``, ``core.introspection``, ``core.device``,
   ``core.paths``: data sampling, the classification head, what the Lab shows,
   where to run, where to cache.
6. ``core.fast``: what makes a trained model fast to serve (our C++ kernels,
   fused layers, speculative decoding, CUDA graphs, prefix caching) and the
   serving decoder that owns them (``core.fast.serving``). Nothing above imports it.
7. ``core.serving``: what a server runs, the engine that decodes many sequences
   at once (continuous batching). Only the service (and bench/) imports it.

This package knows nothing of the web service, the database or training jobs;
``tests/test_imports.py`` holds it to that and to the order above.
"""
