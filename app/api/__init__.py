"""HTTP: ``deps`` (the dependencies as typed aliases, and the one module that reads ``app.state``)
and one router module per resource in ``routes/``. It may import the services, ``app.db``,
``app.schemas`` and the plumbing modules; only ``app.main`` imports it.
"""
