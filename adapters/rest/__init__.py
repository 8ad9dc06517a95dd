"""The OpenAI-compatible REST adapter: JSON and Server-Sent Events in front of chatrpc's gRPC service.

Split by role:

- ``app.py``: the Starlette app, its one shared gRPC channel, and ``run`` (uvicorn).
- ``routes.py``: the HTTP endpoints, a few lines each.
- ``upstream.py``: calls to the gRPC service, with metadata and cancellation when the client leaves.
- ``translate.py``: JSON <-> proto, both ways; the only place that knows both spellings.
- ``sse.py``: the ``text/event-stream`` response of ``"stream": true``.
- ``errors.py``: the OpenAI error envelope and the one gRPC status -> HTTP mapping.
"""

from adapters.rest.app import create_app, run

__all__ = ["create_app", "run"]
