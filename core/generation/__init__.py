"""Turning a model's logits into text: sampling (temperature, top-k, top-p) and the
decoding loop with a KV cache, stop tokens and streaming (the book's chapter 5),
and the chat templates that turn a conversation into a prompt.

Imports ``core.model`` and ``core.tokenizer``, never ``core.fast``: the loop here
is the plain one a reader follows; ``core.fast.serving`` is what a server runs.
"""
