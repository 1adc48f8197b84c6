"""The fast path: what makes a trained model fast to serve, with the same tokens.

``kernels`` builds our C++ kernels (``csrc/``); ``panels``, ``fused_ops``,
``fused_layers`` and ``gguf_matvec`` are the CPU kernels' Python faces;
``packed`` keeps linear weights in the layouts those kernels read, and
``screened_head`` is the exact-argmax output layer; ``speculative`` drafts
tokens with an int8 copy of the model; ``cuda_graphs`` replays decoding steps
on a GPU; ``prefix_cache`` keeps recent conversations' KV caches. ``serving``
is the decoder that owns all of these for one model, and ``transforms``
(``make_fast``, ``fast_for_serving``) builds it with what fits.

It may import every other room of ``core``; none of them imports it, so the
book's path (``core.model``, ``core.generation``) reads without it.
"""
