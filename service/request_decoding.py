"""The bytes of a ChatCompletionRequest (or a CompletionRequest) into the message, or into the reason
they are not one.

grpc answers a request its deserializer cannot decode with INTERNAL and no word of why; yet bytes
that are not a valid request are the client's fault. The completion methods are registered with
`decode_chat_request` and `decode_completion_request` instead (server.py), which hand the servicer
an `UndecodableRequest` for such bytes, and the servicer refuses it with INVALID_ARGUMENT. A string
field that is not UTF-8 (a lone surrogate from a client's JSON, cut-off text) is the usual cause; it
is named in the REST spelling that other errors use (`messages[0].content`, `prompt`).
"""

from __future__ import annotations

from google.protobuf import empty_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from chatrpc.v1 import chat_pb2
from service.errors import InvalidArgument

_LENGTH_DELIMITED = 2  # the wire type of strings, bytes and messages


class UndecodableRequest:
    """Bytes that are not a ChatCompletionRequest, and the error to answer them with."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def decode_chat_request(data: bytes) -> chat_pb2.ChatCompletionRequest | UndecodableRequest:
    return _decode(chat_pb2.ChatCompletionRequest, data)


def decode_completion_request(data: bytes) -> chat_pb2.CompletionRequest | UndecodableRequest:
    return _decode(chat_pb2.CompletionRequest, data)


def _decode(message_class, data: bytes):
    try:
        return message_class.FromString(data)
    except DecodeError as error:
        param = _invalid_utf8(data, message_class.DESCRIPTOR, "")
        if param is not None:
            return UndecodableRequest(
                InvalidArgument(param, f"Invalid '{param}': the text is not valid UTF-8 (or holds a lone surrogate).")
            )
        return UndecodableRequest(
            InvalidArgument(None, f"The request is not a valid {message_class.DESCRIPTOR.full_name}: {error}")
        )


def _rest_name(descriptor: Descriptor, field: FieldDescriptor, index: int, path: str) -> str:
    """The REST path of the ``index``-th occurrence of ``field`` in a ``descriptor`` message at ``path``."""
    if descriptor.full_name.startswith("google.protobuf.") or descriptor.GetOptions().map_entry:
        return path  # inside a JSON value (a schema) or a map entry: the path names the field holding it
    if descriptor is chat_pb2.ContentParts.DESCRIPTOR:
        return f"{path}[{index}]"  # the parts are the content list itself
    # A message's content is one JSON field, "content", a string or a list of parts; so is a
    # completion's prompt, text or token ids.
    name = field.name
    if descriptor is chat_pb2.ChatMessage.DESCRIPTOR and field.name in ("text", "parts"):
        name = "content"
    elif descriptor is chat_pb2.CompletionRequest.DESCRIPTOR and field.name in ("text", "tokens"):
        name = "prompt"
    here = f"{path}.{name}" if path else name
    if field.is_repeated and not (field.message_type and field.message_type.GetOptions().map_entry):
        here += f"[{index}]"
    return here


def _invalid_utf8(data: bytes, descriptor: Descriptor, path: str) -> str | None:
    """The path of the first string field in ``data`` (a ``descriptor`` message) that is not UTF-8.

    The bytes are read as an Empty message, whose fields are all unknown and so unchecked, and each
    length-delimited field is looked up in ``descriptor``: a string is checked, a message is read
    the same way."""
    try:
        fields = UnknownFieldSet(empty_pb2.Empty.FromString(data))
    except DecodeError:
        return None
    seen: dict[int, int] = {}
    for unknown in fields:
        field = descriptor.fields_by_number.get(unknown.field_number)
        if field is None or unknown.wire_type != _LENGTH_DELIMITED:
            continue
        index = seen.get(field.number, 0)
        seen[field.number] = index + 1
        here = _rest_name(descriptor, field, index, path)
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                unknown.data.decode()
            except UnicodeDecodeError:
                return here
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            found = _invalid_utf8(unknown.data, field.message_type, here)
            if found is not None:
                return found
    return None
