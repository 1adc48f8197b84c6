"""One router per resource. A route takes its inputs from the request and from ``app.api.deps``,
calls a service or ``app.db.crud``, and turns a service's refusal into an HTTP status; it never
reads ``app.state``, and routes do not import each other.
"""
