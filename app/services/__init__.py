"""The service's work, apart from HTTP.

``registry`` loads the models and holds their slots; ``workers`` runs each model on a thread
of its own (the chat model's continuous-batching engine, classification in micro-batches
served to owners in turn); ``remote_chat`` is the chat's worker when an external OpenAI-compatible
engine serves it; ``prompts`` turns a
conversation into prompt token ids and sampling settings; ``chat`` is one chat turn (the
question stored, the prompt planned, the answer started) and ``streaming`` relays that answer
as Server-Sent Events while keeping its row current; ``lab`` measures the served models for the
Lab. These modules may import ``core``, ``app.db``, ``app.schemas`` and the plumbing modules
(``app.settings``, ``app.metrics``); never ``app.api`` or ``app.main``, so only a route knows
about requests. Among themselves: ``registry`` uses ``workers`` and ``remote_chat`` (which uses ``workers``' limits); ``streaming`` uses ``prompts``
and ``workers``; ``chat`` uses ``registry``, ``prompts`` and ``streaming``; ``lab`` uses ``prompts``.
"""
