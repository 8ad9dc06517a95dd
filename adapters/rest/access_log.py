"""One access line per HTTP request, with the request id the service's lines about it carry too.

The adapter gives each HTTP request its id first thing (the client's `X-Request-Id`, or a new one:
upstream.py) and binds it to every log line written while the request is handled (chatrpc/logs.py).
When the answer has gone (a stream's last event), one line at INFO on the `chatrpc.rest.access`
logger says who asked (the client's address), what (method, path), how it ended (status) and how
long it took. uvicorn's own access lines, which have no id, are off (app.py). Bodies and headers
are never in it.
"""

from __future__ import annotations

import logging
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.rest.upstream import request_id
from chatrpc.logs import bind_request_id

ACCESS_LOGGER = logging.getLogger("chatrpc.rest.access")


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        identity = request_id(Request(scope))
        bind_request_id(identity)
        started = time.perf_counter()
        status = 500  # what the server answers when the app raises before it starts a response

        async def send_logged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            if ACCESS_LOGGER.isEnabledFor(logging.INFO):
                client = scope.get("client")
                fields = {
                    "client": f"{client[0]}:{client[1]}" if client else None,
                    "http_method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                }
                ACCESS_LOGGER.info(
                    "%s %s %s %s %d duration_ms=%s", identity, fields["client"], fields["http_method"],
                    fields["path"], status, fields["duration_ms"], extra=fields,
                )  # fmt: skip
