"""JSON <-> proto for the Chat Completions API: the one place that knows both spellings.

Requests: ``parse_body`` reads the HTTP body, ``chat_request_from_json`` turns the JSON object into
a ``chatrpc.v1.ChatCompletionRequest``. Only JSON types and shapes are checked here, each failure a
400 naming the field as OpenAI does (``messages[0].content``, ``logit_bias``); value ranges
(temperature in [0, 2], n, ...) are the gRPC service's to check, so that gRPC clients get them too.
JSON ``null`` means "not set" for every optional field.

Responses: ``chat_completion_to_json``, ``chunk_to_json``, ``model_list_to_json`` and
``model_to_json`` build the OpenAI dicts by hand (``json_format.MessageToDict`` would spell enums
and int64 the proto way), and ``encode`` turns them into bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import orjson

from adapters.rest.errors import invalid_request
from chatrpc.v1 import chat_pb2 as pb
from chatrpc.v1.wire import FINISH_REASON_NAMES, RESPONSE_FORMAT_TYPES, ROLES, TOOL_CHOICE_MODES

__all__ = [
    "chat_completion_to_json",
    "chat_request_from_json",
    "chunk_to_json",
    "encode",
    "model_list_to_json",
    "model_to_json",
    "parse_body",
]

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)

# OpenAI's stand-in for the log probability of an impossible token: JSON has no -Infinity.
_MIN_LOGPROB = -9999.0


# ---------------------------------------------------------------------------
# JSON text
# ---------------------------------------------------------------------------


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# Python's json accepts NaN and Infinity, which are not JSON; a request carrying them is refused.
# Requests are read with it rather than orjson, which turns integers beyond 64 bits into floats: a
# too large max_tokens would then be a type error instead of the range error that names it.
_decoder = json.JSONDecoder(parse_constant=_refuse_constant)

_NOT_JSON = (
    "We could not parse the JSON body of your request. The API expects a JSON object "
    "(Content-Type: application/json) as the body."
)


def parse_body(body: bytes) -> dict:
    """The request body as a JSON object; 400 (param null) when it is not JSON or not an object."""
    try:
        value = _decoder.decode(body.decode())
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise invalid_request(_NOT_JSON) from None
    if type(value) is not dict:
        raise invalid_request(
            f"Invalid type for request body: expected an object, but got {_describe(value)} instead.",
            code="invalid_type",
        )
    return value


def encode(value: dict) -> bytes:
    """Compact UTF-8 JSON (orjson: a streamed answer encodes one object per token)."""
    return orjson.dumps(value)


# ---------------------------------------------------------------------------
# Type checks of single JSON values
# ---------------------------------------------------------------------------


def _describe(value: object) -> str:
    kind = type(value)
    if value is None:
        return "null"
    if kind is bool:
        return "a boolean"
    if kind is int:
        return "an integer"
    if kind is float:
        return "a decimal number"
    if kind is str:
        return "a string"
    if kind is list:
        return "an array"
    if kind is dict:
        return "an object"
    return kind.__name__


def _type_error(param: str, expected: str, value: object):
    return invalid_request(
        f"Invalid type for '{param}': expected {expected}, but got {_describe(value)} instead.",
        param=param,
        code="invalid_type",
    )


def _value_error(param: str, value: object, supported: tuple[str, ...]):
    options = ", ".join(f"'{option}'" for option in supported[:-1]) + f", and '{supported[-1]}'"
    return invalid_request(
        f"Invalid value: '{value}'. Supported values are: {options}.",
        param=param,
        code="invalid_value",
    )


def _missing(param: str):
    return invalid_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def _string(value: object, param: str) -> str:
    if type(value) is not str:
        raise _type_error(param, "a string", value)
    if not value.isascii():
        _check_encodable(value, param)
    return value


def _check_encodable(value: str, param: str) -> None:
    # JSON can spell a lone UTF-16 surrogate ("\ud800"), which no UTF-8 text (and so no protobuf
    # string) can carry.
    try:
        value.encode()
    except UnicodeEncodeError as error:
        raise invalid_request(
            f"Invalid '{param}': the string holds {value[error.start]!r} at position {error.start}, "
            "a lone surrogate that is not a Unicode character.",
            param=param,
            code="invalid_value",
        ) from None


def _boolean(value: object, param: str) -> bool:
    if type(value) is not bool:
        raise _type_error(param, "a boolean", value)
    return value


def _number(value: object, param: str) -> float:
    kind = type(value)  # `type(...) is int` leaves bools out: True is an int in Python, not in JSON
    if kind is float:
        return value
    if kind is int:
        try:
            return float(value)
        except OverflowError:
            raise invalid_request(f"Invalid '{param}': number too large.", param=param, code="invalid_value") from None
    raise _type_error(param, "a number", value)


def _integer(value: object, param: str, bounds: tuple[int, int]) -> int:
    if type(value) is not int:
        raise _type_error(param, "an integer", value)
    low, high = bounds
    if value > high:
        raise invalid_request(
            f"Invalid '{param}': integer above maximum value. Expected a value <= {high}, but got {value} instead.",
            param=param,
            code="integer_above_max_value",
        )
    if value < low:
        raise invalid_request(
            f"Invalid '{param}': integer below minimum value. Expected a value >= {low}, but got {value} instead.",
            param=param,
            code="integer_below_min_value",
        )
    return value


def _object(value: object, param: str) -> dict:
    if type(value) is not dict:
        raise _type_error(param, "an object", value)
    return value


def _array(value: object, param: str) -> list:
    if type(value) is not list:
        raise _type_error(param, "an array", value)
    return value


def _optional(target: object, item: dict, key: str, check: Callable[[object, str], object], param: str) -> None:
    """Sets the field `key` of `target` to `item[key]`, checked, unless it is absent or null (JSON
    null means "not set"); `param` is the path of `item` in the request."""
    value = item.get(key)
    if value is not None:
        setattr(target, key, check(value, f"{param}.{key}"))


def _within_doubles(value: object) -> None:
    """Raises OverflowError for an integer past a double's range: JSON Schema's numbers are doubles
    (a Struct, the schema's other form, holds nothing else)."""
    if isinstance(value, int):
        float(value)
    elif isinstance(value, dict):
        for item in value.values():
            _within_doubles(item)
    elif isinstance(value, list):
        for item in value:
            _within_doubles(item)


def _schema_json(value: object, param: str) -> str:
    """A JSON object (a JSON Schema) as compact JSON text, its keys in the client's order: the proto's
    text form of a schema, which the service reads in that order (a Struct would lose it, and the
    order reaches the output: chat.proto, FunctionDefinition.parameters)."""
    try:
        _within_doubles(_object(value, param))
        text = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
        text.encode()  # a lone surrogate cannot be carried
        return text
    except UnicodeEncodeError:
        raise invalid_request(
            f"Invalid '{param}': a string in it holds a lone surrogate, which is not a Unicode character.",
            param=param,
            code="invalid_value",
        ) from None
    except RecursionError:
        raise invalid_request(f"Invalid '{param}': nested too deeply.", param=param, code="invalid_value") from None
    except (ValueError, TypeError, OverflowError):
        raise invalid_request(f"Invalid '{param}': not representable as JSON numbers.", param=param) from None


# ---------------------------------------------------------------------------
# Request: JSON -> chatrpc.v1.ChatCompletionRequest
# ---------------------------------------------------------------------------

_PART_TYPES = ("text", "image_url", "input_audio", "refusal")


def _content_part(part: pb.ContentPart, value: object, param: str) -> None:
    item = _object(value, param)
    kind = item.get("type")
    if kind == "text":
        part.text = _string(item.get("text"), f"{param}.text")
    elif kind == "image_url":
        image = _object(item.get("image_url"), f"{param}.image_url")
        part.image_url.url = _string(image.get("url"), f"{param}.image_url.url")
        _optional(part.image_url, image, "detail", _string, f"{param}.image_url")
    elif kind == "input_audio":
        audio = _object(item.get("input_audio"), f"{param}.input_audio")
        part.input_audio.data = _string(audio.get("data"), f"{param}.input_audio.data")
        part.input_audio.format = _string(audio.get("format"), f"{param}.input_audio.format")
    elif kind == "refusal":
        part.refusal = _string(item.get("refusal"), f"{param}.refusal")
    elif kind is None:
        raise _missing(f"{param}.type")
    else:
        raise _value_error(f"{param}.type", kind, _PART_TYPES)


def _tool_call(call: pb.ToolCall, value: object, param: str) -> None:
    item = _object(value, param)
    _optional(call, item, "id", _string, param)
    kind = item.get("type")
    call.type = "function" if kind is None else _string(kind, f"{param}.type")
    function = item.get("function")
    if function is None:
        raise _missing(f"{param}.function")
    function = _object(function, f"{param}.function")
    call.function.name = _string(function.get("name"), f"{param}.function.name")
    call.function.arguments = _string(function.get("arguments"), f"{param}.function.arguments")


def _message(message: pb.ChatMessage, value: object, param: str) -> None:
    # Keys outside the spec are ignored, as OpenAI does: SDKs echo a response message back into the
    # history with extra keys (annotations, audio, function_call: null).
    item = _object(value, param)
    role = item.get("role")
    if role is None:
        raise _missing(f"{param}.role")
    role_value = ROLES.get(role) if type(role) is str else None
    if role_value is None:
        raise _value_error(f"{param}.role", _string(role, f"{param}.role"), tuple(ROLES))
    message.role = role_value

    content = item.get("content")
    if type(content) is str:
        message.text = _string(content, f"{param}.content")
    elif type(content) is list:
        parts = message.parts
        parts.SetInParent()  # an empty list is still "content given as parts"
        for index, part in enumerate(content):
            _content_part(parts.parts.add(), part, f"{param}.content[{index}]")
    elif content is not None:
        raise _type_error(f"{param}.content", "one of a string or array of objects", content)

    _optional(message, item, "name", _string, param)
    tool_calls = item.get("tool_calls")
    if tool_calls is not None:
        for index, call in enumerate(_array(tool_calls, f"{param}.tool_calls")):
            _tool_call(message.tool_calls.add(), call, f"{param}.tool_calls[{index}]")
    _optional(message, item, "tool_call_id", _string, param)
    _optional(message, item, "refusal", _string, param)


def _messages(request: pb.ChatCompletionRequest, value: object) -> None:
    for index, item in enumerate(_array(value, "messages")):
        _message(request.messages.add(), item, f"messages[{index}]")


def _model(request: pb.ChatCompletionRequest, value: object) -> None:
    request.model = _string(value, "model")


def _logit_bias(request: pb.ChatCompletionRequest, value: object) -> None:
    low, high = _INT64
    target = request.logit_bias
    for key, bias in _object(value, "logit_bias").items():
        digits = key[1:] if key[:1] == "-" else key
        token = int(key) if digits.isascii() and digits.isdigit() else None
        if token is None or not low <= token <= high:
            raise invalid_request(
                f"Invalid key in 'logit_bias': {key}. Keys must be integer token ids.",
                param="logit_bias",
                code="invalid_value",
            )
        target[token] = _number(bias, "logit_bias")


def _stop(request: pb.ChatCompletionRequest, value: object) -> None:
    if type(value) is str:
        request.stop.append(_string(value, "stop"))
    elif type(value) is list:
        request.stop.extend(_string(item, f"stop[{index}]") for index, item in enumerate(value))
    else:
        raise _type_error("stop", "one of a string or array of strings", value)


def _stream_options(request: pb.ChatCompletionRequest, value: object) -> None:
    options = _object(value, "stream_options")
    request.stream_options.SetInParent()
    _optional(request.stream_options, options, "include_usage", _boolean, "stream_options")


def _tool_choice(request: pb.ChatCompletionRequest, value: object) -> None:
    if type(value) is str:
        mode = TOOL_CHOICE_MODES.get(value)
        if mode is None:
            raise _value_error("tool_choice", value, tuple(TOOL_CHOICE_MODES))
        request.tool_choice.mode = mode
        return
    choice = _object(value, "tool_choice")
    kind = choice.get("type")
    if kind != "function":
        if kind is None:
            raise _missing("tool_choice.type")
        raise _value_error("tool_choice.type", _string(kind, "tool_choice.type"), ("function",))
    function = choice.get("function")
    if function is None:
        raise _missing("tool_choice.function")
    name = _object(function, "tool_choice.function").get("name")
    if name is None:
        raise _missing("tool_choice.function.name")
    request.tool_choice.function_name = _string(name, "tool_choice.function.name")


def _tool(tool: pb.Tool, value: object, param: str) -> None:
    item = _object(value, param)
    kind = item.get("type")
    tool.type = "function" if kind is None else _string(kind, f"{param}.type")
    function = item.get("function")
    if function is None:
        raise _missing(f"{param}.function")
    function = _object(function, f"{param}.function")
    definition = tool.function
    name = function.get("name")
    if name is None:
        raise _missing(f"{param}.function.name")
    definition.name = _string(name, f"{param}.function.name")
    _optional(definition, function, "description", _string, f"{param}.function")
    parameters = function.get("parameters")
    if parameters is not None:
        definition.parameters_json = _schema_json(parameters, f"{param}.function.parameters")
    _optional(definition, function, "strict", _boolean, f"{param}.function")


def _tools(request: pb.ChatCompletionRequest, value: object) -> None:
    for index, item in enumerate(_array(value, "tools")):
        _tool(request.tools.add(), item, f"tools[{index}]")


def _response_format(request: pb.ChatCompletionRequest, value: object) -> None:
    item = _object(value, "response_format")
    kind = item.get("type")
    if kind is None:
        raise _missing("response_format.type")
    kind_value = RESPONSE_FORMAT_TYPES.get(kind) if type(kind) is str else None
    if kind_value is None:
        raise _value_error(
            "response_format.type",
            _string(kind, "response_format.type"),
            tuple(RESPONSE_FORMAT_TYPES),
        )
    response_format = request.response_format
    response_format.type = kind_value
    schema_item = item.get("json_schema")
    if schema_item is None:
        return
    schema_item = _object(schema_item, "response_format.json_schema")
    target = response_format.json_schema
    _optional(target, schema_item, "name", _string, "response_format.json_schema")
    _optional(target, schema_item, "description", _string, "response_format.json_schema")
    schema = schema_item.get("schema")
    if schema is not None:
        target.schema_json = _schema_json(schema, "response_format.json_schema.schema")
    _optional(target, schema_item, "strict", _boolean, "response_format.json_schema")
    target.SetInParent()


def _scalar(name: str, check):
    def assign(request: pb.ChatCompletionRequest, value: object) -> None:
        setattr(request, name, check(value, name))

    return assign


def _bounded_integer(name: str, bounds: tuple[int, int]):
    def assign(request: pb.ChatCompletionRequest, value: object) -> None:
        setattr(request, name, _integer(value, name, bounds))

    return assign


# Every top-level field the adapter accepts: the spec's, plus max_completion_tokens and
# parallel_tool_calls from the current OpenAI API. Each entry sets one proto field.
_FIELDS = {
    "messages": _messages,
    "model": _model,
    "frequency_penalty": _scalar("frequency_penalty", _number),
    "logit_bias": _logit_bias,
    "logprobs": _scalar("logprobs", _boolean),
    "top_logprobs": _bounded_integer("top_logprobs", _INT32),
    "max_tokens": _bounded_integer("max_tokens", _INT32),
    "max_completion_tokens": _bounded_integer("max_completion_tokens", _INT32),
    "n": _bounded_integer("n", _INT32),
    "presence_penalty": _scalar("presence_penalty", _number),
    "response_format": _response_format,
    "seed": _bounded_integer("seed", _INT64),
    "stop": _stop,
    "stream": _scalar("stream", _boolean),
    "stream_options": _stream_options,
    "temperature": _scalar("temperature", _number),
    "tool_choice": _tool_choice,
    "tools": _tools,
    "top_p": _scalar("top_p", _number),
    "user": _scalar("user", _string),
    "parallel_tool_calls": _scalar("parallel_tool_calls", _boolean),
}


def chat_request_from_json(body: dict) -> pb.ChatCompletionRequest:
    """The request body (a JSON object) as a proto; raises a 400 ``APIError`` naming the field."""
    request = pb.ChatCompletionRequest()
    for key, value in body.items():
        assign = _FIELDS.get(key)
        if assign is None:
            raise invalid_request(f"Unrecognized request argument supplied: {key}", param=key)
        if value is not None:
            assign(request, value)
    if body.get("messages") is None:
        raise _missing("messages")
    if body.get("model") is None:
        raise invalid_request("you must provide a model parameter", param="model", code="missing_required_parameter")
    return request


# ---------------------------------------------------------------------------
# Response: proto -> JSON
# ---------------------------------------------------------------------------

# FinishReason -> its JSON spelling; FINISH_REASON_UNSPECIFIED (not finished) is JSON null.
_FINISH_REASONS: dict[int, str | None] = {pb.FINISH_REASON_UNSPECIFIED: None, **FINISH_REASON_NAMES}


def _usage(usage: pb.Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.prompt_tokens_details.cached_tokens},
    }


def _logprob_value(logprob: float) -> float:
    # -inf and NaN fail the comparison and become OpenAI's -9999.0.
    return logprob if logprob >= _MIN_LOGPROB else _MIN_LOGPROB


def _token_logprob(entry: pb.TokenLogprob) -> dict:
    return {
        "token": entry.token,
        "logprob": _logprob_value(entry.logprob),
        "bytes": list(entry.bytes) if entry.HasField("bytes") else None,
        "top_logprobs": [
            {
                "token": top.token,
                "logprob": _logprob_value(top.logprob),
                "bytes": list(top.bytes) if top.HasField("bytes") else None,
            }
            for top in entry.top_logprobs
        ],
    }


def _logprobs(choice: pb.Choice | pb.ChunkChoice) -> dict | None:
    if not choice.HasField("logprobs"):
        return None
    logprobs = choice.logprobs
    content, refusal = logprobs.content, logprobs.refusal
    return {
        # OpenAI spells "no refusal tokens" null, and content null only beside refusal tokens.
        "content": [_token_logprob(entry) for entry in content] if content or not refusal else None,
        "refusal": [_token_logprob(entry) for entry in refusal] if refusal else None,
    }


def _tool_calls(calls) -> list[dict]:
    return [
        {
            "id": call.id,
            "type": call.type or "function",
            "function": {"name": call.function.name, "arguments": call.function.arguments},
        }
        for call in calls
    ]


def _response_message(message: pb.ResponseMessage) -> dict:
    result = {
        "role": message.role or "assistant",
        "content": message.content if message.HasField("content") else None,
        "refusal": message.refusal if message.HasField("refusal") else None,
    }
    if message.tool_calls:
        result["tool_calls"] = _tool_calls(message.tool_calls)
    return result


def chat_completion_to_json(completion: pb.ChatCompletion) -> dict:
    """A ``ChatCompletion`` as the API's ``chat.completion`` object."""
    return {
        "id": completion.id,
        "object": completion.object or "chat.completion",
        "created": completion.created,
        "model": completion.model,
        "choices": [
            {
                "index": choice.index,
                "message": _response_message(choice.message),
                "logprobs": _logprobs(choice),
                "finish_reason": _FINISH_REASONS.get(choice.finish_reason),
            }
            for choice in completion.choices
        ],
        "usage": _usage(completion.usage),
        "system_fingerprint": (completion.system_fingerprint if completion.HasField("system_fingerprint") else None),
        "service_tier": completion.service_tier if completion.HasField("service_tier") else None,
    }


def _delta(delta: pb.Delta) -> dict:
    result = {}
    if delta.HasField("role"):
        result["role"] = delta.role
    if delta.HasField("content"):
        result["content"] = delta.content
    if delta.HasField("refusal"):
        result["refusal"] = delta.refusal
    if delta.tool_calls:
        calls = []
        for call in delta.tool_calls:
            item = {"index": call.index}
            if call.HasField("id"):
                item["id"] = call.id
            if call.HasField("type"):
                item["type"] = call.type
            if call.HasField("function"):
                function = {}
                if call.function.HasField("name"):
                    function["name"] = call.function.name
                if call.function.HasField("arguments"):
                    function["arguments"] = call.function.arguments
                item["function"] = function
            calls.append(item)
        result["tool_calls"] = calls
    return result


def chunk_to_json(chunk: pb.ChatCompletionChunk, include_usage: bool) -> dict:
    """A ``ChatCompletionChunk`` as the API's ``chat.completion.chunk`` object.

    As OpenAI does, ``usage`` appears only when the request set ``stream_options.include_usage``:
    null in every chunk but the last, which has no choices and the usage of the whole request.
    """
    result = {
        "id": chunk.id,
        "object": chunk.object or "chat.completion.chunk",
        "created": chunk.created,
        "model": chunk.model,
        "system_fingerprint": chunk.system_fingerprint if chunk.HasField("system_fingerprint") else None,
        "service_tier": chunk.service_tier if chunk.HasField("service_tier") else None,
        "choices": [
            {
                "index": choice.index,
                "delta": _delta(choice.delta),
                "logprobs": _logprobs(choice),
                "finish_reason": _FINISH_REASONS.get(choice.finish_reason),
            }
            for choice in chunk.choices
        ],
    }
    if chunk.HasField("usage"):
        result["usage"] = _usage(chunk.usage)
    elif include_usage:
        result["usage"] = None
    return result


def model_to_json(model: pb.Model) -> dict:
    """A ``Model`` as the API's ``model`` object, with chatrpc's ``capabilities`` beside OpenAI's fields."""
    capabilities = model.capabilities
    return {
        "id": model.id,
        "object": model.object or "model",
        "created": model.created,
        "owned_by": model.owned_by,
        "capabilities": {
            "tools": capabilities.tools,
            "json_object": capabilities.json_object,
            "json_schema": capabilities.json_schema,
        },
    }


def model_list_to_json(models: pb.ModelList) -> dict:
    """A ``ModelList`` as the API's ``list`` object."""
    return {"object": models.object or "list", "data": [model_to_json(model) for model in models.data]}
