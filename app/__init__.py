"""The scratchgpt web service: REST classification, streaming chat, an OpenAI-compatible API and a browser UI.

Build it with :func:`app.main.create_app`; run it with :func:`app.server.serve`.
"""
