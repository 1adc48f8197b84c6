"""The fast path: what makes a trained model fast to serve, with the same tokens.

``kernels`` builds our C++ kernels (``csrc/``); ``panels``, ``fused_ops``,
``fused_layers`` and ``gguf_matvec`` are the CPU kernels' Python faces;
``speculative`` drafts tokens with an int8 copy of the model; ``cuda_graphs``
replays decoding steps on a GPU; ``prefix_cache`` keeps recent conversations'
KV caches; ``transforms`` installs the kernels on a model (``make_fast``).

It may import every other room of ``core``; none of them imports it, so the
book's path (``core.model``, ``core.generation``) reads without it.
"""
