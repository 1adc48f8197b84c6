"""The service's work: what the routes ask for, apart from HTTP.

``registry`` loads the models and holds their slots; ``workers`` runs each model on a thread of
its own (chat jobs one at a time, classification in micro-batches); ``prompts`` turns a
conversation into prompt token ids and sampling settings; ``chat`` is one chat turn (store the
question, plan the prompt, start the answer) and ``streaming`` relays that answer as
Server-Sent Events while keeping its row current; ``lab`` measures the served models for the Lab.
These modules may import ``core``, ``app.db``, ``app.schemas`` and the plumbing modules beside
them (``app.settings``, ``app.metrics``), and each other in that order; never ``app.api`` or
``app.main``, so a route is the only thing that knows about a request.
"""
