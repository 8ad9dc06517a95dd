"""One OpenAI error envelope for every failure, and the one gRPC status -> HTTP mapping.

Every error the adapter returns, whether it found it itself (bad JSON, unknown route) or the
gRPC service reported it, has the OpenAI shape::

    {"error": {"message": "...", "type": "...", "param": "..." | null, "code": "..." | null}}

Contract with the service (documented in protos/chatrpc/v1/chat.proto): on an error status, the
status details string is the human message, and the trailing metadata key
``ERROR_PARAM_METADATA_KEY`` (chatrpc/v1/wire.py) names the offending request field in the REST
spelling (``temperature``, ``messages[2].content``); it becomes ``param``.
"""

from __future__ import annotations

import json

import grpc
from starlette.responses import Response

from chatrpc.v1.wire import ERROR_PARAM_METADATA_KEY

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

# gRPC status -> (HTTP status, error type, error code). Codes not listed are server errors (500).
# Beyond the four client errors the OpenAI API documents, FAILED_PRECONDITION, OUT_OF_RANGE and
# UNIMPLEMENTED follow google.rpc's HTTP mapping so that the SDKs, which retry every 5xx, do not
# retry a request that can never succeed.
_STATUS_MAP: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, INVALID_REQUEST, None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, INVALID_REQUEST, None),
    grpc.StatusCode.OUT_OF_RANGE: (400, INVALID_REQUEST, None),
    grpc.StatusCode.UNAUTHENTICATED: (401, INVALID_REQUEST, "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, INVALID_REQUEST, "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, INVALID_REQUEST, "model_not_found"),
    # OpenAI answers both rate limits and an overloaded server with 429 so that clients back off.
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.CANCELLED: (499, INVALID_REQUEST, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, INVALID_REQUEST, "unsupported"),
    grpc.StatusCode.UNAVAILABLE: (503, SERVER_ERROR, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, SERVER_ERROR, "timeout"),
}
_SERVER_ERROR = (500, SERVER_ERROR, None)

# gRPC refuses a message above its size limit with RESOURCE_EXHAUSTED and this text; that is the
# request's fault, not a rate limit.
_TOO_LARGE_PREFIXES = ("Received message larger than max", "Sent message larger than max")

# A 429 (the service's queue is full) or a 503 (the service is away or shutting down) says when to
# try again. Neither side knows how long it will last; one second is the shortest whole value the
# header can carry and as long as the adapter waits between attempts to reconnect (upstream.py), and
# the OpenAI SDKs wait that long instead of their own back-off.
RETRY_AFTER_SECONDS = 1
_RETRY_LATER_STATUSES = (429, 503)

# ASCII, with \u escapes: a message may quote the client's own text, lone surrogates included,
# which UTF-8 cannot carry but a JSON escape can.
_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


class APIError(Exception):
    """A failure to report to the HTTP client in the OpenAI error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after  # seconds, sent as the Retry-After header

    def __reduce__(self):
        # Raised in body.py's worker processes and sent back pickled: rebuilt with every attribute.
        return (APIError, (self.status, self.message), dict(vars(self)))

    def to_dict(self) -> dict:
        """The envelope ``{"error": {...}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return _encode(self.to_dict()).encode()

    def to_response(self, headers: dict[str, str] | None = None) -> Response:
        if self.retry_after is not None:
            headers = {**(headers or {}), "retry-after": str(self.retry_after)}
        return Response(self.to_json(), self.status, headers, "application/json")

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 for a request the adapter itself cannot read (JSON types and shapes)."""
    return APIError(400, message, param=param, code=code)


_UNAVAILABLE_MESSAGE = "The model service is unavailable: it may be restarting or shutting down. Retry shortly."


def from_rpc_error(error: grpc.RpcError) -> APIError:
    """The HTTP error for a failed gRPC call: status -> HTTP, details -> message, metadata -> param."""
    status_code = error.code()
    message = error.details() or status_code.name
    if status_code is grpc.StatusCode.UNAVAILABLE:
        # gRPC's own text for a channel that cannot connect names the upstream's address, which
        # is the deployment's business, not the client's.
        message = _UNAVAILABLE_MESSAGE
    if status_code is grpc.StatusCode.RESOURCE_EXHAUSTED and message.startswith(_TOO_LARGE_PREFIXES):
        http_status, error_type, code = 413, INVALID_REQUEST, "request_too_large"
    else:
        http_status, error_type, code = _STATUS_MAP.get(status_code, _SERVER_ERROR)
    param = None
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_PARAM_METADATA_KEY:
            param = value
    retry_after = RETRY_AFTER_SECONDS if http_status in _RETRY_LATER_STATUSES else None
    return APIError(http_status, message, type=error_type, param=param, code=code, retry_after=retry_after)


def not_found_route(method: str, path: str) -> APIError:
    return APIError(404, f"Invalid URL ({method} {path})", code="unknown_url")


def method_not_allowed(method: str, path: str) -> APIError:
    return APIError(405, f"Method {method} is not allowed for {path}", code="method_not_allowed")


def internal_error() -> APIError:
    return APIError(500, "The server had an error while processing your request.", type=SERVER_ERROR)
