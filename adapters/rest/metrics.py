"""The REST adapter's Prometheus metrics, served at GET /metrics on its own port.

HTTP requests by route and status, their durations (a stream's until its last event), the event
streams open now, and the errors the gRPC service answered with. The route is the path's template
("/v1/models/{model:path}"), never the path a client sent, so that a client's text does not become
a label value. The process's own metrics (CPU, memory, open files) come with prometheus_client's
default registry.
"""

from __future__ import annotations

import time

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Counters' `_created` series double what a scrape carries and nothing here reads them.
disable_created_metrics()

PREFIX = "chatrpc_"
OTHER_ROUTE = "other"  # a path no route matches (a 404)

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

HTTP_REQUESTS = Counter(
    PREFIX + "http_requests", "HTTP requests answered, by route, method and status.", ["route", "method", "status"]
)
HTTP_DURATION = Histogram(
    PREFIX + "http_request_duration_seconds",
    "From a request's arrival to the end of its answer (a stream's last event), by route.",
    ["route"],
    buckets=_DURATION_BUCKETS,
)
SSE_STREAMS = Gauge(PREFIX + "http_sse_streams_open", "Server-sent event streams being written now.")
UPSTREAM_ERRORS = Counter(
    PREFIX + "upstream_errors", "Calls to the gRPC service that ended with an error status, by code.", ["code"]
)


def upstream_failed(error: grpc.RpcError) -> None:
    """Counts an error status of the gRPC service's, whatever the adapter answers for it."""
    UPSTREAM_ERRORS.labels(error.code().name).inc()


def _is_event_stream(message: Message) -> bool:
    return any(name == b"content-type" and value.startswith(b"text/event-stream") for name, value in message["headers"])


class MetricsMiddleware:
    """Counts and times every HTTP request (pure ASGI: a stream's events pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers when the app raises before it starts a response
        streaming = False

        async def send_counted(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                if _is_event_stream(message):
                    streaming = True
                    SSE_STREAMS.inc()
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            if streaming:
                SSE_STREAMS.dec()
            route = scope.get("route")  # set by Starlette's router on the route that matched
            path = route.path if route is not None else OTHER_ROUTE
            HTTP_REQUESTS.labels(path, scope["method"], str(status)).inc()
            HTTP_DURATION.labels(path).observe(time.perf_counter() - started)


async def metrics(request: Request) -> Response:
    # A few hundred lines of text: cheap enough to write on the event loop.
    return Response(generate_latest(REGISTRY), 200, media_type=CONTENT_TYPE_LATEST)
