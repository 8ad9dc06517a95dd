"""The REST adapter as an ASGI app: ``create_app`` builds it, ``run`` serves it with uvicorn."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette

from adapters.rest.routes import EXCEPTION_HANDLERS, ROUTES
from adapters.rest.upstream import Upstream

_MIB = 1024 * 1024

# Responses with logprobs of long completions outgrow gRPC's default 4 MiB receive limit; the
# service enforces its own limit on requests.
DEFAULT_GRPC_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 64 * _MIB),
    ("grpc.max_send_message_length", 64 * _MIB),
)


def create_app(upstream: str, *, grpc_options: Sequence[tuple[str, Any]] = DEFAULT_GRPC_OPTIONS) -> Starlette:
    """The OpenAI-compatible REST API in front of the chatrpc gRPC service at ``upstream``
    (``HOST:PORT``). One ``grpc.aio`` channel, opened at startup and closed at shutdown, carries
    every request."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.upstream = Upstream(upstream, grpc_options)
        try:
            yield
        finally:
            await app.state.upstream.close()

    return Starlette(routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)


def run(host: str, port: int, upstream: str, log_level: str = "info") -> None:
    """Serves the adapter on ``host:port`` with uvicorn until interrupted."""
    import uvicorn

    # Named rather than left to uvicorn's "auto", which falls back to asyncio's loop and h11's
    # pure-Python parser without a word when uvloop or httptools is missing: those are slower per
    # request, and the adapter's whole cost over gRPC is what benchmarks/serving.py holds to its goal.
    uvicorn.run(
        create_app(upstream), host=host, port=port, log_level=log_level, lifespan="on", loop="uvloop", http="httptools"
    )
