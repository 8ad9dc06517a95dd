"""The adapter's OpenAPI document, built from the sources the translation itself works from.

- The JSON bodies are the messages of protos/chatrpc/v1/chat.proto: their descriptors (the committed
  stubs, which the adapter runs) give the fields, their types and their nesting, and the .proto's
  comments, read back through protoc, describe them.
- The request's top-level fields are translate.py's field table (translate_completions.py's for a
  text completion), its part types and integer bounds;
  enum values are spelled by chatrpc/v1/wire.py; the error envelope is errors.py's, with a response
  for every status of its gRPC mapping.
- What the proto cannot say is written here once, each table naming the code it follows: where the
  JSON spelling differs from the proto's (translate.py), and the checks the service makes on a value
  alone (service/request.py, service/completion_request.py, service/tool_calls.py). Checks that depend
  on another field or on a flag
  (`n` up to --max-n, the prompt within the context) are in the descriptions.

``make openapi`` writes the document to adapters/rest/openapi.json (``python -m adapters.rest.openapi``)
and ``make openapi-check`` fails when that file is stale (``--check``), as for the gRPC stubs; the
adapter serves the file at ``GET /openapi.json``. tests/adapters/test_openapi.py holds the real server
to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from adapters.rest import errors, translate, translate_completions
from chatrpc.v1 import chat_pb2 as pb
from chatrpc.v1.wire import FINISH_REASON_NAMES, RESPONSE_FORMAT_TYPE_NAMES, ROLE_NAMES, TOOL_CHOICE_MODE_NAMES

DOCUMENT_PATH = Path(__file__).with_name("openapi.json")
_PROTOS = Path(__file__).resolve().parents[2] / "protos"
_PROTO_FILE = "chatrpc/v1/chat.proto"

JsonSchema = dict[str, Any]

_SCHEMAS = "#/components/schemas/"
_ENUM_SPELLINGS = {
    pb.Role.DESCRIPTOR.full_name: ROLE_NAMES,
    pb.FinishReason.DESCRIPTOR.full_name: FINISH_REASON_NAMES,
    pb.ToolChoiceMode.DESCRIPTOR.full_name: TOOL_CHOICE_MODE_NAMES,
    pb.ResponseFormatType.DESCRIPTOR.full_name: RESPONSE_FORMAT_TYPE_NAMES,
}
_SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: "number",
    FieldDescriptor.TYPE_FLOAT: "number",
    FieldDescriptor.TYPE_BOOL: "boolean",
    FieldDescriptor.TYPE_STRING: "string",
}
# translate.py checks every integer against the range of its proto field.
_INTEGER_BOUNDS = {FieldDescriptor.TYPE_INT32: translate._INT32, FieldDescriptor.TYPE_INT64: translate._INT64}
_STRUCT = "google.protobuf.Struct"
# The request fields translate.py requires.
_REQUIRED_FIELDS = ("messages", "model")
# A token's log probability as translate.py writes it: below this, this (JSON has no -Infinity).
_LOGPROB = {"type": "number", "minimum": translate._MIN_LOGPROB}

# ---------------------------------------------------------------------------
# What the proto cannot say
# ---------------------------------------------------------------------------

# The checks service/request.py, service/completion_request.py and service/tool_calls.py make on a
# value alone, as JSON Schema,
# by the proto field they apply to (a repeated field's entry applies to each item); the service
# refuses a value outside them with a 400 that names the field.
_SERVICE_CHECKS: dict[str, JsonSchema] = {
    "chatrpc.v1.ChatCompletionRequest.frequency_penalty": {"minimum": -2, "maximum": 2},
    "chatrpc.v1.ChatCompletionRequest.presence_penalty": {"minimum": -2, "maximum": 2},
    "chatrpc.v1.ChatCompletionRequest.temperature": {"minimum": 0, "maximum": 2},
    "chatrpc.v1.ChatCompletionRequest.top_p": {"exclusiveMinimum": 0, "maximum": 1},
    "chatrpc.v1.ChatCompletionRequest.top_logprobs": {"minimum": 0, "maximum": 20},
    "chatrpc.v1.ChatCompletionRequest.max_tokens": {"minimum": 1},
    "chatrpc.v1.ChatCompletionRequest.max_completion_tokens": {"minimum": 1},
    "chatrpc.v1.ChatCompletionRequest.n": {"minimum": 1},
    "chatrpc.v1.ChatCompletionRequest.stop": {"minLength": 1},
    "chatrpc.v1.ChatCompletionRequest.LogitBiasEntry.value": {"minimum": -100, "maximum": 100},
    "chatrpc.v1.ToolCall.id": {"minLength": 1},
    "chatrpc.v1.FunctionCall.name": {"minLength": 1},
    "chatrpc.v1.Tool.type": {"enum": ["function"]},
    "chatrpc.v1.FunctionDefinition.name": {"pattern": "^[A-Za-z0-9_-]{1,64}$"},
    "chatrpc.v1.FunctionDefinition.parameters": {"properties": {"type": {"const": "object"}}},
    "chatrpc.v1.JsonSchema.name": {"pattern": "^[A-Za-z0-9_-]{1,64}$"},
    "chatrpc.v1.CompletionRequest.best_of": {"minimum": 1},
    "chatrpc.v1.CompletionRequest.frequency_penalty": {"minimum": -2, "maximum": 2},
    "chatrpc.v1.CompletionRequest.LogitBiasEntry.value": {"minimum": -100, "maximum": 100},
    "chatrpc.v1.CompletionRequest.logprobs": {"minimum": 0, "maximum": 5},
    "chatrpc.v1.CompletionRequest.max_tokens": {"minimum": 1},
    "chatrpc.v1.CompletionRequest.n": {"minimum": 1},
    "chatrpc.v1.CompletionRequest.presence_penalty": {"minimum": -2, "maximum": 2},
    "chatrpc.v1.CompletionRequest.stop": {"minLength": 1},
    # No served model can fill in the middle: only an empty suffix, which asks for nothing.
    "chatrpc.v1.CompletionRequest.suffix": {"maxLength": 0},
    "chatrpc.v1.CompletionRequest.temperature": {"minimum": 0, "maximum": 2},
    "chatrpc.v1.CompletionRequest.top_p": {"exclusiveMinimum": 0, "maximum": 1},
    "chatrpc.v1.PromptTokens.ids": {"minimum": 0},
}
# The same for the number of items of a repeated field.
_SERVICE_COUNT_CHECKS: dict[str, JsonSchema] = {
    "chatrpc.v1.ChatCompletionRequest.messages": {"minItems": 1},
    "chatrpc.v1.PromptTokens.ids": {"minItems": 1},
}

# The content parts the service takes (service/request.py: _message_text): the models take text
# only; a refusal part belongs to an assistant message.
_TAKEN_PARTS = ("text", "refusal")

# What a request field needs of another (service/request.py: check_parameters, check_tools): when
# the first is set to anything but null and the values listed, the second must be present and match.
_REQUEST_DEPENDENCIES: list[tuple[str, tuple, str, JsonSchema]] = [
    ("top_logprobs", (), "logprobs", {"const": True}),
    ("stream_options", (), "stream", {"const": True}),
    ("parallel_tool_calls", (), "tools", {"type": "array", "minItems": 1}),
    ("tool_choice", ("none",), "tools", {"type": "array", "minItems": 1}),
]
# The same for a text completion (service/completion_request.py: check_completion_parameters).
_COMPLETION_DEPENDENCIES: list[tuple[str, tuple, str, JsonSchema]] = [
    ("stream_options", (), "stream", {"const": True}),
]
# And what a text completion's field rules out: with echo true, no logprobs (the prompt's tokens
# have none).
_COMPLETION_EXCLUSIONS: list[tuple[str, JsonSchema, str]] = [("echo", {"const": True}, "logprobs")]

# Fields that the proto leaves without presence but translate.py lets a request leave out, filling
# in a default ("function").
_DEFAULTED_IN_REQUESTS = {"chatrpc.v1.ToolCall.type", "chatrpc.v1.Tool.type"}
# Message fields (which have presence) that translate.py requires.
_REQUIRED_IN_REQUESTS = {"chatrpc.v1.ToolCall.function", "chatrpc.v1.Tool.function"}

# Response fields that translate.py leaves out when unset instead of writing null: the optional
# fields of a chunk's delta, a message's tool_calls when there are none, and a chunk's usage unless
# the request set stream_options.include_usage (then null in every chunk but the last).
_OMITTED_WHEN_UNSET = {
    "chatrpc.v1.Delta",
    "chatrpc.v1.ToolCallDelta",
    "chatrpc.v1.FunctionCallDelta",
    "chatrpc.v1.ResponseMessage.tool_calls",
    "chatrpc.v1.ChatCompletionChunk.usage",
    "chatrpc.v1.Completion.usage",  # in a stream's chunks (a whole text completion always has it)
}
# Repeated response fields that translate.py writes as null when empty (as OpenAI does).
_NULL_WHEN_EMPTY = {"chatrpc.v1.ChoiceLogprobs.content", "chatrpc.v1.ChoiceLogprobs.refusal"}
# The `object` field of each response, as translate.py fills it in.
_OBJECT_NAMES = {
    "chatrpc.v1.ChatCompletion": "chat.completion",
    "chatrpc.v1.ChatCompletionChunk": "chat.completion.chunk",
    "chatrpc.v1.ModelList": "list",
    "chatrpc.v1.Model": "model",
    "chatrpc.v1.Completion": "text_completion",
}
# translate.py writes a token's log probability below this as this (JSON has no -Infinity).
_LOGPROB_FIELDS = {
    "chatrpc.v1.TokenLogprob.logprob",
    "chatrpc.v1.TopLogprob.logprob",
    "chatrpc.v1.CompletionLogprobs.token_logprobs",
}
# Response enum fields that take only some of their enum's values: a text completion never calls tools.
_ENUM_VALUES_USED = {"chatrpc.v1.CompletionChoice.finish_reason": ("stop", "length", "content_filter")}
# A text completion's alternatives at a position, which translate_completions.py spells as an object
# token -> logprob (the more likely of two with the same text).
_TOKEN_MAPS = {"chatrpc.v1.TopLogprobs"}

# Descriptions for the REST spelling where the .proto's comment speaks of gRPC.
_REST_DESCRIPTIONS = {
    "chatrpc.v1.ChatCompletionRequest": "The body of POST /v1/chat/completions. Fields set to null count as not set. "
    "An integer is written without a fraction or exponent (1, not 1.0), as OpenAI requires.",
    "chatrpc.v1.ChatCompletionRequest.messages": "The conversation so far, oldest first: at least one message, "
    "at most the server's --max-messages, and the prompt they make must fit the model's context.",
    "chatrpc.v1.ChatCompletionRequest.model": "Id of the model to use (GET /v1/models lists them).",
    "chatrpc.v1.ChatCompletionRequest.logit_bias": "Token id -> bias in [-100, 100], added to that token's logit "
    "before sampling; the ids are of the model's vocabulary; at most the server's --max-logit-bias entries.",
    "chatrpc.v1.ChatCompletionRequest.max_tokens": "Deprecated spelling of max_completion_tokens: the most tokens "
    "to generate; the prompt and these must fit the model's context.",
    "chatrpc.v1.ChatCompletionRequest.n": "How many choices to generate for the prompt, at most the server's "
    "--max-n. Default 1.",
    "chatrpc.v1.ChatCompletionRequest.stop": "A string or up to the server's --max-stop-strings strings (each of "
    "at most --max-stop-length characters); generation stops before the first of them and never includes it.",
    "chatrpc.v1.ChatCompletionRequest.stream": "Send the completion as Server-Sent Events of "
    "chat.completion.chunk objects, ending with `data: [DONE]`.",
    "chatrpc.v1.ChatCompletionRequest.stream_options": "Options for streamed responses; only with stream true.",
    "chatrpc.v1.ChatCompletionRequest.tool_choice": "Which tool, if any, the model must call: none, auto, "
    "required (auto and required only with tools), or one function of tools by name.",
    "chatrpc.v1.ChatCompletionRequest.tools": "The functions the model may call, with distinct names, at most the "
    "server's --max-tools; their parameter schemas and response_format's together take at most --max-schema-bytes.",
    "chatrpc.v1.ChatCompletionRequest.response_format": "The format the output must follow; absent means plain text. "
    "A JSON format cannot be combined with tool_choice auto (the default when tools are given), and the schema must "
    "be one the constrained decoding supports.",
    "chatrpc.v1.ChatCompletionRequest.parallel_tool_calls": "Whether the model may emit several tool calls in one "
    "turn; only with tools. Default true.",
    "chatrpc.v1.ChatCompletionRequest.top_logprobs": "In [0, 20]: how many most likely alternatives to return "
    "per token; only with logprobs true.",
    "chatrpc.v1.ChatMessage.content": "The content: a string or a list of parts. Required but for an assistant "
    "message that carries tool_calls or a refusal. The models take text only: image_url and input_audio parts "
    "are refused.",
    "chatrpc.v1.ChatMessage.tool_call_id": "The call this message answers; required for role tool.",
    "chatrpc.v1.ToolChoice": "A mode (none, auto or required), or one function of tools by name.",
    "chatrpc.v1.CompletionRequest": "The body of POST /v1/completions, the legacy text completion: the model "
    "continues the prompt as it is, with no chat template. Fields set to null count as not set. An integer is "
    "written without a fraction or exponent (1, not 1.0), as OpenAI requires.",
    "chatrpc.v1.CompletionRequest.model": "Id of the model to use (GET /v1/models lists them).",
    "chatrpc.v1.CompletionRequest.prompt": "What to continue: text (tokenized with the model's BOS token first; "
    "text that spells a special token stays text), or token ids of the model's vocabulary (taken as they are). "
    "OpenAI's arrays of strings and of token-id arrays hold a batch of prompts; this server takes one prompt per "
    "request, so such an array holds exactly one. The prompt must fit the model's context.",
    "chatrpc.v1.CompletionRequest.best_of": "How many candidates to generate and pick the best n from. This "
    "server does not rank candidates: it must equal n (1 when n is left out).",
    "chatrpc.v1.CompletionRequest.echo": "Whether each choice's text starts with the prompt's (in a stream, in "
    "the choice's first chunk). Not with logprobs.",
    "chatrpc.v1.CompletionRequest.logit_bias": "Token id -> bias in [-100, 100], added to that token's logit "
    "before sampling; the ids are of the model's vocabulary; at most the server's --max-logit-bias entries.",
    "chatrpc.v1.CompletionRequest.logprobs": "In [0, 5]: return the log probability of each generated token and "
    "this many most likely alternatives per token (and the generated token among them when it is not one). "
    "Not with echo.",
    "chatrpc.v1.CompletionRequest.max_tokens": "The most tokens to generate; the prompt and these must fit the "
    "model's context. Default 16, or what room the context leaves if less.",
    "chatrpc.v1.CompletionRequest.n": "How many choices to generate for the prompt, at most the server's "
    "--max-n. Default 1.",
    "chatrpc.v1.CompletionRequest.stop": "A string or up to the server's --max-stop-strings strings (each of "
    "at most --max-stop-length characters); generation stops before the first of them and never includes it.",
    "chatrpc.v1.CompletionRequest.stream": "Send the completion as Server-Sent Events of text_completion "
    "objects, ending with `data: [DONE]`.",
    "chatrpc.v1.CompletionRequest.stream_options": "Options for streamed responses; only with stream true.",
    "chatrpc.v1.CompletionRequest.suffix": "Text that comes after the completion (fill-in-the-middle). No served "
    "model can fill in the middle: a suffix other than the empty string is refused.",
    "chatrpc.v1.Completion.usage": "Token counts of the request: always in a whole completion; in a stream, "
    "only when stream_options.include_usage is true: null in every chunk but the last, which has no choices.",
    "chatrpc.v1.CompletionLogprobs.top_logprobs": "The most likely tokens at each position, each position an "
    "object token -> logprob: `logprobs` of them, and the generated token too when it is not among them.",
}

# ---------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------


def _nullable(schema: JsonSchema) -> JsonSchema:
    kind = schema.get("type")
    if isinstance(kind, str):
        schema = {**schema, "type": [kind, "null"]}
        if "enum" in schema:
            schema["enum"] = [*schema["enum"], None]
        return schema
    if set(schema) == {"anyOf"}:
        return {"anyOf": [*schema["anyOf"], {"type": "null"}]}
    return {"anyOf": [schema, {"type": "null"}]}


def _marked_optional(field: FieldDescriptor) -> bool:
    """Whether the .proto marks ``field`` `optional`, which puts it alone into a oneof named after it."""
    oneof = field.containing_oneof
    return oneof is not None and oneof.name == f"_{field.name}"


# The oneofs of a JSON schema's two proto forms (a Struct, or JSON text that keeps its key order):
# in JSON both are the one object, spelled as the Struct field's name.
_SCHEMA_FORMS = {
    "chatrpc.v1.JsonSchema.schema_form": "schema",
    "chatrpc.v1.FunctionDefinition.parameters_form": "parameters",
}


def _in_real_oneof(field: FieldDescriptor) -> bool:
    return field.containing_oneof is not None and not _marked_optional(field)


class _Builder:
    """Builds the components' schemas, one per proto message and direction, as they are referenced."""

    def __init__(self, comments: dict[str, str]) -> None:
        self.comments = comments
        self.schemas: dict[str, JsonSchema] = {}

    def describe(self, full_name: str, schema: JsonSchema) -> JsonSchema:
        text = _REST_DESCRIPTIONS.get(full_name) or self.comments.get(full_name)
        return {"description": text, **schema} if text else schema

    def ref(self, message: Descriptor, *, request: bool) -> JsonSchema:
        name = self.schema_name(message, request=request)
        if name not in self.schemas:
            build = self.request_message if request else self.response_message
            self.schemas[name] = self.describe(message.full_name, build(message))
        return {"$ref": _SCHEMAS + name}

    def schema_name(self, message: Descriptor, *, request: bool) -> str:
        # ToolCall and FunctionCall are read in requests (a history's tool calls) and written in
        # responses, with different rules for absent fields: the request side gets its own name.
        if request and message.full_name in ("chatrpc.v1.ToolCall", "chatrpc.v1.FunctionCall"):
            return f"{message.name}Param"
        return message.name

    # -- values ---------------------------------------------------------------

    def enum(self, enum: EnumDescriptor) -> JsonSchema:
        return {"type": "string", "enum": list(_ENUM_SPELLINGS[enum.full_name].values())}

    def value(self, field: FieldDescriptor, *, request: bool) -> JsonSchema:
        """The schema of one value of ``field`` (one item, for a repeated field)."""
        kind = field.type
        if kind in _SCALARS:
            schema: JsonSchema = {"type": _SCALARS[kind]}
        elif kind in _INTEGER_BOUNDS:
            schema = {"type": "integer"}
            if request:
                schema["minimum"], schema["maximum"] = _INTEGER_BOUNDS[kind]
        elif kind == FieldDescriptor.TYPE_BYTES:
            schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}}
        elif kind == FieldDescriptor.TYPE_ENUM:
            schema = self.enum(field.enum_type)
            if field.full_name in _ENUM_VALUES_USED:
                schema["enum"] = [value for value in schema["enum"] if value in _ENUM_VALUES_USED[field.full_name]]
        elif field.message_type.full_name == _STRUCT:
            schema = {"type": "object"}  # any JSON object (a JSON Schema)
        elif field.message_type.full_name in _TOKEN_MAPS:
            schema = {"type": "object", "additionalProperties": _LOGPROB}
        else:
            return self.ref(field.message_type, request=request)
        if request:
            schema = self.checked(field.full_name, schema)
        elif field.full_name in _LOGPROB_FIELDS:
            schema["minimum"] = _LOGPROB["minimum"]
        return schema

    @staticmethod
    def checked(full_name: str, schema: JsonSchema) -> JsonSchema:
        checks = _SERVICE_CHECKS.get(full_name, {})
        merged = {**schema, **checks}
        for bound, pick in (("minimum", max), ("maximum", min)):
            if bound in schema and bound in checks:
                merged[bound] = pick(schema[bound], checks[bound])
        return merged

    def field(self, field: FieldDescriptor, *, request: bool) -> JsonSchema:
        """The schema of ``field``'s JSON value, without null."""
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            # JSON spells the integer keys as strings (translate.py: _logit_bias).
            schema = {
                "type": "object",
                "propertyNames": {"pattern": "^-?[0-9]+$"},
                "additionalProperties": self.value(message.fields_by_name["value"], request=request),
            }
        elif field.is_repeated:
            schema = {"type": "array", "items": self.value(field, request=request)}
            if request:
                schema.update(_SERVICE_COUNT_CHECKS.get(field.full_name, {}))
        else:
            schema = self.value(field, request=request)
        return schema

    # -- requests -------------------------------------------------------------

    def request_message(self, message: Descriptor) -> JsonSchema:
        if message.full_name == "chatrpc.v1.ChatMessage":
            return self.chat_message(message)
        if message.full_name == "chatrpc.v1.ToolChoice":
            return self.tool_choice(message)
        return self.request_fields(message)

    def request_fields(self, message: Descriptor) -> JsonSchema:
        properties: dict[str, JsonSchema] = {}
        required = []
        for field in message.fields:
            if _in_real_oneof(field) and field.containing_oneof.full_name in _SCHEMA_FORMS:
                if field.name != _SCHEMA_FORMS[field.containing_oneof.full_name]:
                    continue  # the schema's JSON text: the same JSON object on the wire, one spelling in REST
            elif _in_real_oneof(field):
                oneof = field.containing_oneof
                if oneof.full_name != "chatrpc.v1.ChatMessage.content":
                    raise ValueError(f"no JSON spelling is known for the oneof {oneof.full_name}")
                if oneof.name not in properties:
                    properties[oneof.name] = self.describe(oneof.full_name, {})  # per role: chat_message
                continue
            schema = self.field(field, request=True)
            # A field with presence (optional, a message, a list) may be left out or null; one
            # without is required, but where translate.py fills in a default.
            optional = field.has_presence or field.is_repeated or field.full_name in _DEFAULTED_IN_REQUESTS
            if field.full_name in _REQUIRED_IN_REQUESTS:
                optional = False
            if optional:
                schema = _nullable(schema)
            else:
                required.append(field.name)
            properties[field.name] = self.describe(field.full_name, schema)
        schema = {"type": "object", "properties": properties}
        if required:
            schema["required"] = required
        return schema

    def chat_message(self, message: Descriptor) -> JsonSchema:
        """A message of each role, as service/request.py (check_messages) checks it: content is
        required (a string, or a non-empty list of parts), but for an assistant message that carries
        tool_calls or a refusal; only assistant messages carry tool_calls and refusal parts; a tool
        message names the call it answers."""
        fields = self.request_fields(message)
        variants = {}
        for role in ROLE_NAMES.values():
            assistant = role == "assistant"
            properties = {**fields["properties"], "role": {"const": role}}
            content = {"anyOf": [{"type": "string"}, self.content_parts(assistant=assistant)]}
            properties["content"] = {**properties["content"], **(_nullable(content) if assistant else content)}
            schema: JsonSchema = {"type": "object", "properties": properties, "required": ["role"]}
            if assistant:
                schema["anyOf"] = [
                    {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
                    {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array", "minItems": 1}}},
                    {"required": ["refusal"], "properties": {"refusal": {"type": "string"}}},
                ]
            else:
                schema["required"].append("content")
                properties["tool_calls"] = {
                    "description": "Only assistant messages carry tool calls.",
                    "type": ["array", "null"],
                    "maxItems": 0,
                }
            if role == "tool":
                properties["tool_call_id"] = {**properties["tool_call_id"], "type": "string", "minLength": 1}
                schema["required"].append("tool_call_id")
            name = f"{role.capitalize()}Message"
            self.schemas[name] = {"description": f"A message of role {role}.", **schema}
            variants[role] = _SCHEMAS + name
        return {
            "oneOf": [{"$ref": ref} for ref in variants.values()],
            "discriminator": {"propertyName": "role", "mapping": variants},
        }

    def content_parts(self, *, assistant: bool) -> JsonSchema:
        """A list of content parts (translate.py: _content_part spells each `{"type": NAME, NAME:
        value}`, NAME a member of ContentPart's oneof) of the kinds service/request.py takes: the
        models take text only, and a refusal belongs to an assistant message."""
        (oneof,) = pb.ContentPart.DESCRIPTOR.oneofs
        names = tuple(field.name for field in oneof.fields)
        if set(names) != set(translate._PART_TYPES):
            raise ValueError(f"ContentPart's members {names} are not translate.py's part types")
        kinds = []
        for field in oneof.fields:
            if field.name not in _TAKEN_PARTS or (field.name == "refusal" and not assistant):
                continue
            name = "".join(word.capitalize() for word in field.name.split("_")) + "Part"
            self.schemas[name] = self.describe(
                field.full_name,
                {
                    "type": "object",
                    "properties": {"type": {"const": field.name}, field.name: self.field(field, request=True)},
                    "required": ["type", field.name],
                },
            )
            kinds.append({"$ref": _SCHEMAS + name})
        return {"type": "array", "items": kinds[0] if len(kinds) == 1 else {"anyOf": kinds}, "minItems": 1}

    def tool_choice(self, message: Descriptor) -> JsonSchema:
        # translate.py (_tool_choice): a mode is a string, a function name the object OpenAI uses.
        fields = message.fields_by_name
        return {
            "anyOf": [
                self.describe(fields["mode"].full_name, self.enum(fields["mode"].enum_type)),
                self.describe(
                    fields["function_name"].full_name,
                    {
                        "type": "object",
                        "properties": {
                            "type": {"const": "function"},
                            "function": {
                                "type": "object",
                                "properties": {"name": {"type": "string"}},
                                "required": ["name"],
                            },
                        },
                        "required": ["type", "function"],
                    },
                ),
            ]
        }

    def request_body(self) -> JsonSchema:
        """ChatCompletionRequest with exactly the fields of translate.py's table, which refuses others."""
        return self.top_level_request(
            pb.ChatCompletionRequest.DESCRIPTOR, translate._FIELDS, _REQUIRED_FIELDS, _REQUEST_DEPENDENCIES
        )

    def completion_request_body(self) -> JsonSchema:
        """CompletionRequest with exactly the fields of translate_completions.py's table."""
        exclusions = [
            {
                "if": {"properties": {field: value}, "required": [field]},
                "then": {"properties": {ruled_out: {"type": "null"}}},
            }
            for field, value, ruled_out in _COMPLETION_EXCLUSIONS
        ]
        return self.top_level_request(
            pb.CompletionRequest.DESCRIPTOR,
            translate_completions._FIELDS,
            translate_completions.REQUIRED_FIELDS,
            _COMPLETION_DEPENDENCIES,
            exclusions,
        )

    def top_level_request(
        self,
        message: Descriptor,
        fields: dict,
        required: tuple[str, ...],
        dependencies: list[tuple[str, tuple, str, JsonSchema]],
        conditions: list[JsonSchema] = (),
    ) -> JsonSchema:
        """A request body with exactly the fields of a translation table (``fields``), which
        refuses others."""
        properties = {}
        for name in fields:
            if name in message.oneofs_by_name:
                oneof = message.oneofs_by_name[name]
                schema, full_name = self.prompt(oneof), oneof.full_name
            else:
                field = message.fields_by_name[name]
                schema, full_name = self.field(field, request=True), field.full_name
            if name == "stop":  # translate.py (_stop): one string, or a list of them
                schema = {"anyOf": [schema["items"], schema]}
            # null is "not set" (translate.py), which the required fields cannot be.
            if name not in required:
                schema = _nullable(schema)
            properties[name] = self.describe(full_name, schema)
        dependent = [
            {
                "if": {"properties": {field: {"not": {"enum": [None, *unless]}}}, "required": [field]},
                "then": {"properties": {needed: schema}, "required": [needed]},
            }
            for field, unless, needed, schema in dependencies
        ]
        self.schemas[message.name] = self.describe(
            message.full_name,
            {
                "type": "object",
                "properties": properties,
                "required": list(required),
                "additionalProperties": False,
                "allOf": [*dependent, *conditions],
            },
        )
        return {"$ref": _SCHEMAS + message.name}

    def prompt(self, oneof) -> JsonSchema:
        """A text completion's prompt (translate_completions.py: _prompt): text or token ids, either
        alone or as the one item of OpenAI's array of a batch."""
        if oneof.full_name != "chatrpc.v1.CompletionRequest.prompt":
            raise ValueError(f"no JSON spelling is known for the oneof {oneof.full_name}")
        fields = {field.name: field for field in oneof.fields}
        text = self.field(fields["text"], request=True)
        ids = self.field(fields["tokens"].message_type.fields_by_name["ids"], request=True)
        return {
            "anyOf": [
                text,
                {"type": "array", "items": text, "minItems": 1, "maxItems": 1},
                ids,
                {"type": "array", "items": ids, "minItems": 1, "maxItems": 1},
            ]
        }

    # -- responses ------------------------------------------------------------

    def response_message(self, message: Descriptor) -> JsonSchema:
        properties: dict[str, JsonSchema] = {}
        required = []
        leaves_out_unset = message.full_name in _OMITTED_WHEN_UNSET
        for field in message.fields:
            name = field.full_name
            if field.name == "object" and message.full_name in _OBJECT_NAMES:
                schema: JsonSchema = {"const": _OBJECT_NAMES[message.full_name]}
            else:
                schema = self.field(field, request=False)
            omitted = name in _OMITTED_WHEN_UNSET or (leaves_out_unset and (field.has_presence or field.is_repeated))
            # Unset is null, unless left out: an enum's *_UNSPECIFIED, a field the .proto marks
            # optional, and the lists written as null when empty.
            if (
                field.type == FieldDescriptor.TYPE_ENUM
                or name in _NULL_WHEN_EMPTY
                or (_marked_optional(field) and not leaves_out_unset)
            ):
                schema = _nullable(schema)
            if omitted and field.is_repeated:
                schema["minItems"] = 1
            if not omitted:
                required.append(field.name)
            properties[field.name] = self.describe(name, schema)
        schema = {"type": "object", "properties": properties}
        if required:
            schema["required"] = required
        return schema


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

# What the adapter answers with a status of its own, beside the service's statuses (errors.py).
_ADAPTER_ERRORS = {
    400: "The adapter's own: a body that is not a JSON object, a field that is unknown or of the wrong type, or "
    "a text completion's prompt that is a batch of several; `param` names the field.",
    401: "The adapter's own: an Authorization header that no API key can be.",
    404: "The adapter's own: GET /v1/models/{model} of a model that is not served.",
    413: "A body larger than the server's --max-request-bytes, refused before it is read, or a request over the "
    "service's message limit: type `invalid_request_error`, code `request_too_large`.",
    500: "Anything unexpected: type `server_error`.",
    503: "The adapter's own: GET /health or /health/ready while the service is not serving.",
}


def _error_statuses() -> dict[int, str]:
    """HTTP status -> description, for every status errors.py maps a gRPC status onto."""
    grpc_statuses: dict[tuple[int, str, str | None], list[str]] = {}
    for grpc_status, answer in errors._STATUS_MAP.items():
        grpc_statuses.setdefault(answer, []).append(f"`{grpc_status.name}`")
    by_status: dict[int, list[str]] = {errors._SERVER_ERROR[0]: []}
    for (status, error_type, code), names in grpc_statuses.items():
        spelled = f"{' or '.join(names)} from the service: type `{error_type}`" + (f", code `{code}`." if code else ".")
        by_status.setdefault(status, []).append(spelled)
    for status, text in _ADAPTER_ERRORS.items():
        by_status.setdefault(status, []).append(text)
    return {status: " ".join(by_status[status]) for status in sorted(by_status)}


def _health_path(operation: str, summary: str, answer: str, *, with_503: bool) -> dict:
    ok = {"type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"]}
    return {
        "get": {
            "operationId": operation,
            "summary": summary,
            "security": [],
            "responses": {"200": _answer(answer, ok), **(_error_responses([503]) if with_503 else {})},
        }
    }


def _error_schema() -> JsonSchema:
    # The keys of the envelope as errors.py writes it.
    envelope = errors.APIError(400, "").to_dict()
    (outer,) = envelope
    keys = tuple(envelope[outer])
    nullable = {"param", "code"}
    inner = {
        "type": "object",
        "properties": {key: {"type": ["string", "null"] if key in nullable else "string"} for key in keys},
        "required": list(keys),
    }
    return {
        "description": "Every error, as OpenAI spells it: `param` names the request field at fault, "
        "in the REST spelling (`messages[2].content`), or is null.",
        "type": "object",
        "properties": {outer: inner},
        "required": [outer],
    }


# ---------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------

_JSON = "application/json"
_REQUEST_ID = {"x-request-id": {"$ref": "#/components/headers/RequestId"}}
_RETRY_AFTER = {"retry-after": {"$ref": "#/components/headers/RetryAfter"}}


def _answer(description: str, schema: JsonSchema, headers: JsonSchema = _REQUEST_ID) -> JsonSchema:
    return {"description": description, "headers": headers, "content": {_JSON: {"schema": schema}}}


def _error_responses(statuses) -> dict[str, JsonSchema]:
    return {str(status): {"$ref": f"#/components/responses/Error{status}"} for status in statuses}


def _event_stream(chunk: JsonSchema, error: JsonSchema) -> JsonSchema:
    """Each event of a stream (OpenAPI 3.2's itemSchema): its data is a chunk, an error that ends
    the stream, or the [DONE] that ends it otherwise (sse.py)."""
    return {
        "itemSchema": {
            "type": "object",
            "properties": {
                "data": {
                    "type": "string",
                    "if": {"const": "[DONE]"},
                    "else": {"contentMediaType": _JSON, "contentSchema": {"oneOf": [chunk, error]}},
                }
            },
            "required": ["data"],
        }
    }


def build() -> dict:
    """The whole OpenAPI document."""
    builder = _Builder(_proto_comments())
    request_body = builder.request_body()
    completion = builder.ref(pb.ChatCompletion.DESCRIPTOR, request=False)
    chunk = builder.ref(pb.ChatCompletionChunk.DESCRIPTOR, request=False)
    model_list = builder.ref(pb.ModelList.DESCRIPTOR, request=False)
    model = builder.ref(pb.Model.DESCRIPTOR, request=False)
    text_request_body = builder.completion_request_body()
    text_completion = builder.ref(pb.Completion.DESCRIPTOR, request=False)
    usage = builder.ref(pb.Usage.DESCRIPTOR, request=False)
    error = {"$ref": _SCHEMAS + "ErrorResponse"}

    statuses = _error_statuses()
    service_errors = [status for status in statuses if status != 413]
    stream = _event_stream(chunk, error)
    paths = {
        "/v1/chat/completions": {
            "post": {
                "operationId": "createChatCompletion",
                "summary": "Creates a chat completion, at once or as a stream.",
                "requestBody": {"required": True, "content": {_JSON: {"schema": request_body}}},
                "responses": {
                    "200": {
                        "description": "The completion: a chat.completion object, or with stream true Server-Sent "
                        "Events, each `data: ` and a chat.completion.chunk, the last `data: [DONE]`. An error after "
                        "the stream has started is sent as one event, `data: ` and an ErrorResponse, that ends it.",
                        "headers": _REQUEST_ID,
                        "content": {_JSON: {"schema": completion}, "text/event-stream": stream},
                    },
                    **_error_responses(statuses),
                },
            }
        },
        "/v1/completions": {
            "post": {
                "operationId": "createCompletion",
                "summary": "Creates a text completion (the legacy Completions API), at once or as a stream.",
                "requestBody": {"required": True, "content": {_JSON: {"schema": text_request_body}}},
                "responses": {
                    "200": {
                        "description": "The completion: a text_completion object, or with stream true Server-Sent "
                        "Events, each `data: ` and a text_completion object (a chunk), the last `data: [DONE]`. An "
                        "error after the stream has started is sent as one event, `data: ` and an ErrorResponse, "
                        "that ends it.",
                        "headers": _REQUEST_ID,
                        "content": {
                            # A whole completion always has its usage.
                            _JSON: {
                                "schema": {
                                    "allOf": [text_completion, {"properties": {"usage": usage}, "required": ["usage"]}]
                                }
                            },
                            "text/event-stream": _event_stream(text_completion, error),
                        },
                    },
                    **_error_responses(statuses),
                },
            }
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "summary": "Lists the models this server serves.",
                "responses": {"200": _answer("The models.", model_list), **_error_responses(service_errors)},
            }
        },
        "/v1/models/{model}": {
            "get": {
                "operationId": "retrieveModel",
                "summary": "One model this server serves.",
                "parameters": [
                    {
                        "name": "model",
                        "in": "path",
                        "required": True,
                        "description": "The model's id; it may contain slashes.",
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {"200": _answer("The model.", model), **_error_responses(service_errors)},
            }
        },
        "/health": _health_path(
            "health", "Whether the gRPC server behind the adapter is serving.", "It is serving.", with_503=True
        ),
        "/health/ready": _health_path(
            "ready",
            "Whether the chat service behind the adapter takes requests: its models are loaded and it is not "
            "draining (a readiness probe).",
            "It takes requests.",
            with_503=True,
        ),
        "/health/live": _health_path(
            "live", "Whether the adapter's process answers (a liveness probe).", "It answers.", with_503=False
        ),
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "security": [],
                "responses": {"200": _answer("The OpenAPI document.", {"type": "object"})},
            }
        },
    }
    return {
        "openapi": "3.2.0",
        "info": {
            "title": "chatrpc",
            "version": pb.DESCRIPTOR.package.rpartition(".")[2],
            "description": "OpenAI's Chat Completions API, and its legacy Completions API, as chatrpc's REST "
            "adapter serves them, in front of the gRPC service of protos/chatrpc/v1/chat.proto. Generated by "
            "adapters/rest/openapi.py.",
        },
        "security": [{"bearerAuth": []}, {}],
        "paths": paths,
        "components": {
            "schemas": {**builder.schemas, "ErrorResponse": _error_schema()},
            "responses": {
                f"Error{status}": _answer(
                    description,
                    error,
                    {**_REQUEST_ID, **_RETRY_AFTER} if status in errors._RETRY_LATER_STATUSES else _REQUEST_ID,
                )
                for status, description in statuses.items()
            },
            "headers": {
                "RequestId": {
                    "description": "The client's x-request-id, or one made for the request.",
                    "required": True,
                    "schema": {"type": "string"},
                },
                "RetryAfter": {
                    "description": "Seconds to wait before trying again, when the answer came from the service "
                    "(its queue is full, or it is away).",
                    "schema": {"type": "integer", "minimum": 0},
                },
            },
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key, when the server has keys (CHATRPC_API_KEYS, --api-key-file); "
                    "a server without keys needs none.",
                }
            },
        },
    }


def _proto_comments() -> dict[str, str]:
    """Full name -> the leading comment in chat.proto of each message, field, oneof and enum."""
    # grpcio-tools is a development dependency (the test extra), as for `make proto`.
    from grpc_tools import protoc

    include = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "chat.binpb"
        status = protoc.main(
            [
                "protoc",
                f"-I{_PROTOS}",
                f"-I{include}",
                "--include_source_info",
                f"--descriptor_set_out={output}",
                str(_PROTOS / _PROTO_FILE),
            ]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed on {_PROTO_FILE} ({status})")
        (file,) = descriptor_pb2.FileDescriptorSet.FromString(output.read_bytes()).file
    comments = {tuple(where.path): where.leading_comments for where in file.source_code_info.location}
    # Paths into FileDescriptorProto: message_type is field 4, enum_type 5; in DescriptorProto,
    # field is 2 and oneof_decl 8.
    named = {}
    for i, message in enumerate(file.message_type):
        name = f"{file.package}.{message.name}"
        named[name] = comments.get((4, i))
        for j, field in enumerate(message.field):
            named[f"{name}.{field.name}"] = comments.get((4, i, 2, j))
        for j, oneof in enumerate(message.oneof_decl):
            named[f"{name}.{oneof.name}"] = comments.get((4, i, 8, j))
    for i, enum in enumerate(file.enum_type):
        named[f"{file.package}.{enum.name}"] = comments.get((5, i))
    return {name: " ".join(comment.split()) for name, comment in named.items() if comment}


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters.rest.openapi", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help=f"fail if {DOCUMENT_PATH.name} is not what it builds")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOCUMENT_PATH.exists() or DOCUMENT_PATH.read_text() != text:
            print(f"{DOCUMENT_PATH} is stale: run 'make openapi'", file=sys.stderr)
            return 1
        print(f"{DOCUMENT_PATH.name} matches what adapters/rest/openapi.py builds")
        return 0
    DOCUMENT_PATH.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
