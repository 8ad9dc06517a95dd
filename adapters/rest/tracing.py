"""A span per HTTP request when tracing is on (chatrpc/tracing.py, --otlp-endpoint).

The span continues the client's W3C `traceparent` header and is the current span while the request
is handled, so that the gRPC call it makes carries it to the service (upstream.py, `call_metadata`),
whose spans become its children. A stream's span lasts until its last event.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.rest.upstream import REQUEST_ID_SCOPE_KEY
from chatrpc import tracing


class TracingMiddleware:
    def __init__(self, app: ASGIApp, tracer: Any) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        method = scope["method"]
        headers = ((name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"])
        parent = tracing.extract(tracing.trace_headers(headers))
        span = self.tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"], "url.scheme": scope["scheme"]},
        )
        token = context.attach(trace.set_span_in_context(span, parent))
        status = 500

        async def send_traced(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_traced)
        except BaseException as error:
            span.record_exception(error)
            raise
        finally:
            route = scope.get("route")  # set by Starlette's router on the route that matched
            if route is not None:
                span.update_name(f"{method} {route.path}")
                span.set_attribute("http.route", route.path)
            span.set_attribute("http.response.status_code", status)
            request_id = scope.get(REQUEST_ID_SCOPE_KEY)
            if request_id is not None:
                span.set_attribute("chatrpc.request_id", request_id)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()
            context.detach(token)
