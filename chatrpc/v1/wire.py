"""The wire-level names of chatrpc.v1 that generated code does not carry, written once for the
service and the REST adapter alike (protos/chatrpc/v1/chat.proto documents each of them).

- The metadata keys of the API key, of the request id and of the trace context, and the trailing
  metadata key of an error status that names the request parameter at fault.
- The JSON spelling of every enum value: its name without the enum's prefix, in lower case
  (`ROLE_USER` is "user", `FINISH_REASON_TOOL_CALLS` is "tool_calls"); `*_UNSPECIFIED` has none.
- The number of choices a request asks for when it leaves `n` out, and the tokens a text completion
  generates when it leaves `max_tokens` out.
- Which request ids a client may choose, and the form of those the server makes.
"""

from __future__ import annotations

import uuid

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from chatrpc.v1 import chat_pb2

# The call metadata that carries the client's API key, as `Bearer <key>` (HTTP's Authorization header).
AUTHORIZATION_METADATA_KEY = "authorization"

# The request id: the REST adapter sends its HTTP request's (the client's `X-Request-Id`, or one it
# made); the service uses it, or makes one for a gRPC client that sent none, and returns it in the
# call's initial metadata.
REQUEST_ID_METADATA_KEY = "x-request-id"
# Longer ids are replaced, not cut: a cut id would no longer match the client's own.
MAX_REQUEST_ID_LENGTH = 128

# A hash of the chat's stable beginning (or the client's session id) that the REST adapter sends
# with each chat call for gRPC's ring-hash balancing to pick the replica holding the chat's cache
# (adapters/rest/routing.py); the service ignores it.
AFFINITY_METADATA_KEY = "x-chatrpc-affinity"

# W3C Trace Context (https://www.w3.org/TR/trace-context/): the HTTP headers of a client's trace,
# carried as call metadata of the same names from the REST adapter to the service.
TRACE_CONTEXT_METADATA_KEYS = ("traceparent", "tracestate")

# An INVALID_ARGUMENT status names the offending parameter in this trailing metadata key, in the
# REST spelling (`temperature`, `messages[2].content`); the REST adapter returns it as `param`.
ERROR_PARAM_METADATA_KEY = "error-param"

# `n` when the request leaves it out.
DEFAULT_CHOICES = 1
# A text completion's `max_tokens` when the request leaves it out (OpenAI's default for
# /v1/completions; a chat completion's default is whatever room the context leaves).
DEFAULT_COMPLETION_TOKENS = 16


def _spellings(enum: EnumTypeWrapper) -> dict[int, str]:
    """Enum value -> JSON spelling, derived from the value names in the .proto."""
    prefix = enum.DESCRIPTOR.values[0].name.removesuffix("UNSPECIFIED")
    return {
        value.number: value.name.removeprefix(prefix).lower()
        for value in enum.DESCRIPTOR.values
        if not value.name.endswith("_UNSPECIFIED")
    }


ROLE_NAMES = _spellings(chat_pb2.Role)
FINISH_REASON_NAMES = _spellings(chat_pb2.FinishReason)
TOOL_CHOICE_MODE_NAMES = _spellings(chat_pb2.ToolChoiceMode)
RESPONSE_FORMAT_TYPE_NAMES = _spellings(chat_pb2.ResponseFormatType)

ROLES = {name: value for value, name in ROLE_NAMES.items()}
FINISH_REASONS = {name: value for value, name in FINISH_REASON_NAMES.items()}
TOOL_CHOICE_MODES = {name: value for value, name in TOOL_CHOICE_MODE_NAMES.items()}
RESPONSE_FORMAT_TYPES = {name: value for value, name in RESPONSE_FORMAT_TYPE_NAMES.items()}


def requested_choices(request: chat_pb2.ChatCompletionRequest | chat_pb2.CompletionRequest) -> int:
    """How many choices the request asks for (`n`, or its default)."""
    return request.n if request.HasField("n") else DEFAULT_CHOICES


def usable_request_id(value: str | None) -> bool:
    """Whether a client's request id is kept as it is: printable ASCII, 1 to MAX_REQUEST_ID_LENGTH
    characters (what gRPC metadata can carry); any other is replaced by `new_request_id()`."""
    return bool(value) and len(value) <= MAX_REQUEST_ID_LENGTH and value.isascii() and value.isprintable()


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"
