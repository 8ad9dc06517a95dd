"""The service's errors and their one mapping onto gRPC status codes.

Everything below the servicer, the engine included, reports a failure as a `ServiceError` whose
class carries its gRPC status code; `abort_with` turns it into the RPC's status in one place. An
INVALID_ARGUMENT names the offending request parameter both in the message and in the trailing
metadata (chatrpc/v1/wire.py: ERROR_PARAM_METADATA_KEY), which the REST adapter turns into the
`param` of OpenAI's error envelope.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import grpc

from chatrpc.v1.wire import ERROR_PARAM_METADATA_KEY


class ServiceError(Exception):
    """A failure that is reported to the client with a gRPC status code."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidArgument(ServiceError):
    """A request parameter is wrong or not supported; `param` names it (None: the request as a whole)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message, param=param)


class ModelNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist or you do not have access to it.", param="model")


class QueueFull(ServiceError):
    """The scheduler's queue of waiting requests is full (or closed)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class InFlightLimit(QueueFull):
    """One API key already has as many requests waiting or running as --max-inflight-per-key allows."""


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class GenerationFailed(ServiceError):
    """The engine could not go on with a sequence (a failed decode, sampling or grammar step)."""

    code = grpc.StatusCode.INTERNAL


class ShuttingDown(ServiceError):
    """The server stopped before the sequence finished."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self) -> None:
        super().__init__("The server is shutting down.")


async def abort_with(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    """End the RPC with `error`'s status; never returns."""
    if error.param is not None:
        context.set_trailing_metadata(((ERROR_PARAM_METADATA_KEY, error.param),))
    await context.abort(error.code, error.message)


def reported_as_status(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a servicer method, unary or streaming: a `ServiceError` it raises ends the RPC with
    that error's status (`abort_with`)."""
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def streaming(self, request, context):
            try:
                async for item in handler(self, request, context):
                    yield item
            except ServiceError as error:
                await abort_with(context, error)

        return streaming

    @functools.wraps(handler)
    async def unary(self, request, context):
        try:
            return await handler(self, request, context)
        except ServiceError as error:
            await abort_with(context, error)

    return unary
