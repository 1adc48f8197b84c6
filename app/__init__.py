"""The scratchgpt web service: REST classification, streaming chat, an OpenAI-compatible API and a browser UI.

Build it with :func:`app.main.create_app`; run it with :func:`app.server.serve`.

The layout follows FastAPI's full-stack template: ``api/`` is HTTP (typed dependencies in
``deps.py``, one router per resource in ``routes/``), ``services/`` the work (the models and
their workers, prompts, the chat turn, streaming, the Lab), ``db/`` the tables, data
functions and migrations, and the modules at the top are the plumbing: ``main`` (the app
factory), ``server`` (uvicorn), ``settings``, ``security``, ``logs``, ``metrics``, ``openapi``,
``ui`` (the pages' rendering) and ``schemas`` (the request and response bodies). The
template keeps its plumbing in a ``core`` package; here that name belongs to the model
library. Imports point one way: ``main`` -> ``api`` -> ``services`` -> ``db``, ``schemas`` and
the plumbing, with ``core`` under the services. ``app`` may import ``core`` and its web and
database libraries, never ``training``.
"""
