"""scratchgpt's building blocks: tokenizers, data, the model, generation and weights.

This package knows nothing of the web service, the database or training jobs.
"""
