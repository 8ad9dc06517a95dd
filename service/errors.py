"""The service's errors and their one mapping onto gRPC status codes.

Handlers raise `ServiceError` (or a subclass); `abort_with` turns it into a gRPC status
in one place. An INVALID_ARGUMENT names the offending request parameter both in the message and
in the trailing metadata key `error-param`, which the REST adapter turns into the `param` of
OpenAI's error envelope.
"""

from __future__ import annotations

import grpc

ERROR_PARAM_METADATA_KEY = "error-param"


class ServiceError(Exception):
    """A failure that is reported to the client with a gRPC status code."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidArgument(ServiceError):
    """A request parameter is wrong or not supported; `param` names it."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message, param=param)


class ModelNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist or you do not have access to it.", param="model")


class QueueFull(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


async def abort_with(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    """End the RPC with `error`'s status; never returns."""
    if error.param is not None:
        context.set_trailing_metadata(((ERROR_PARAM_METADATA_KEY, error.param),))
    await context.abort(error.code, error.message)
