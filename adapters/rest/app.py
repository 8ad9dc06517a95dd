"""The REST adapter as an ASGI app: ``create_app`` builds it, ``run`` serves it with uvicorn."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware

from adapters.rest.access_log import AccessLogMiddleware
from adapters.rest.body import BodyReader
from adapters.rest.metrics import MetricsMiddleware
from adapters.rest.routes import EXCEPTION_HANDLERS, ROUTES
from adapters.rest.routing import Routing
from adapters.rest.tracing import TracingMiddleware
from adapters.rest.upstream import Upstream
from chatrpc import tracing
from chatrpc.tls import ChannelTLS

_MIB = 1024 * 1024

# Responses with logprobs of long completions outgrow gRPC's default 4 MiB receive limit; the
# service enforces its own limit on requests.
DEFAULT_GRPC_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 64 * _MIB),
    ("grpc.max_send_message_length", 64 * _MIB),
)


def create_app(
    upstream: str,
    *,
    max_request_bytes: int,
    grpc_options: Sequence[tuple[str, Any]] = DEFAULT_GRPC_OPTIONS,
    upstream_tls: ChannelTLS | None = None,
    routing: Routing = Routing.PREFIX,
) -> Starlette:
    """The OpenAI-compatible REST API in front of the chatrpc gRPC service at ``upstream`` (a gRPC
    target: ``HOST:PORT``, or several replicas, which ``routing`` picks from: routing.py), refusing
    request bodies over ``max_request_bytes`` (body.py). One ``grpc.aio`` channel, opened at startup
    and closed at shutdown, carries every request; over TLS (and mTLS) with ``upstream_tls``, in
    plaintext without."""
    options = list(grpc_options) if upstream_tls is None else [*grpc_options, *upstream_tls.options]
    credentials = None if upstream_tls is None else upstream_tls.credentials

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.upstream = Upstream(upstream, options, credentials, routing)
        try:
            await app.state.body_reader.start()
            yield
        finally:
            app.state.body_reader.close()
            await app.state.upstream.close()

    # Outside the exception handlers: they see every answer, the error envelopes included. The access
    # line's comes first, as it gives the request its id.
    middleware = [Middleware(AccessLogMiddleware), Middleware(MetricsMiddleware)]
    tracer = tracing.tracer()
    if tracer is not None:
        middleware.insert(1, Middleware(TracingMiddleware, tracer=tracer))
    app = Starlette(
        routes=ROUTES,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
        middleware=middleware,
    )
    app.state.body_reader = BodyReader(max_request_bytes)  # its worker processes start with the app
    return app


def run(
    host: str,
    port: int,
    upstream: str,
    *,
    max_request_bytes: int,
    log_level: str = "info",
    upstream_tls: ChannelTLS | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    routing: Routing = Routing.PREFIX,
) -> None:
    """Serves the adapter on ``host:port`` with uvicorn until interrupted: HTTPS with the PEM
    certificate chain and key in ``ssl_certfile`` and ``ssl_keyfile``, HTTP without."""
    import uvicorn

    # Named rather than left to uvicorn's "auto", which falls back to asyncio's loop and h11's
    # pure-Python parser without a word when uvloop or httptools is missing: those are slower per
    # request, and the adapter's whole cost over gRPC is what benchmarks/serving.py holds to its goal.
    # Once it has shut down, uvicorn raises the signal that stopped it again, to end the process by
    # it: after a clean drain on SIGTERM (how Kubernetes and `chatrpc serve` stop the adapter) the
    # process would report being killed. The handler it restores first makes that an exit with 0,
    # as the gRPC service does; before uvicorn takes the signal over, it stops the start-up.
    signal.signal(signal.SIGTERM, _exit_drained)
    uvicorn.run(
        create_app(upstream, max_request_bytes=max_request_bytes, upstream_tls=upstream_tls, routing=routing),
        host=host,
        port=port,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        log_level=log_level,
        # access_log.py writes them, with the request id.
        access_log=False,
        lifespan="on",
        # chatrpc/logs.py has configured the root logger (text or JSON); uvicorn's loggers go there.
        log_config=None,
        loop="uvloop",
        http="httptools",
    )


def _exit_drained(signum: int, frame: object) -> None:
    raise SystemExit(0)
