"""Checking a ChatCompletionRequest and turning it into what the engine runs.

Every parameter of the spec is either honoured or refused here with INVALID_ARGUMENT naming it,
never silently ignored. The checks that need no model come first (`check_parameters`), then the
ones that need its tokenizer and context size (`build_generation`). The checks of the fields that
text completions share with chats (sampling, `n`, `stop`, streaming, `logit_bias`'s token ids) are
the helpers that completion_request.py calls too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from chatrpc.v1 import chat_pb2
from chatrpc.v1.wire import ROLE_NAMES, requested_choices
from service.engine.json_constraints import JSON_OBJECT_SCHEMA
from service.errors import InvalidArgument
from service.limits import RequestLimits
from service.tool_calls import ToolSpec, check_tool, forced_call_schema

if TYPE_CHECKING:
    from service.engine.json_constraints import ConstraintCompiler
    from service.engine.model import LoadedModel

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """What the sampler needs for one sequence."""

    temperature: float = 1.0
    top_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class Generation:
    """One request as the engine runs it: prompt tokens in, text out."""

    prompt_tokens: list[int]
    max_new_tokens: int
    stop: list[str]
    sampling: SamplingParams
    n: int = 1
    grammar: str | None = None  # llguidance grammar the output must follow


@dataclass(frozen=True)
class CheckedRequest:
    """The request's parameters, checked, before the model is involved."""

    messages: list[dict[str, Any]]
    max_tokens: int | None
    max_tokens_param: str
    stop: list[str]
    sampling: SamplingParams
    include_usage: bool
    n: int = 1
    json_schema: dict[str, Any] | None = None  # from response_format json_object / json_schema
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: str = "none"  # none, auto, required or function
    tool_name: str | None = None  # the function named by tool_choice
    parallel_tool_calls: bool = True

    @property
    def forces_tool_call(self) -> bool:
        return self.tool_choice in ("required", "function")


def _check_range(param: str, value: float, low: float, high: float, *, low_open: bool = False) -> float:
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise InvalidArgument(param, f"Invalid value for '{param}': {value} is not in {bracket}{low:g}, {high:g}].")
    return value


def _message_text(index: int, message: chat_pb2.ChatMessage) -> str | None:
    kind = message.WhichOneof("content")
    if kind == "text":
        return message.text
    if kind == "parts":
        if not message.parts.parts:
            raise InvalidArgument(f"messages[{index}].content", "Content given as a list needs at least one part.")
        texts = []
        for j, part in enumerate(message.parts.parts):
            which = part.WhichOneof("part")
            if which == "text":
                texts.append(part.text)
            elif which == "refusal" and message.role == chat_pb2.ROLE_ASSISTANT:
                texts.append(part.refusal)
            elif which is None:
                raise InvalidArgument(f"messages[{index}].content[{j}]", "A content part must have a type.")
            else:
                raise InvalidArgument(
                    f"messages[{index}].content[{j}].{which}",
                    f"This model takes text only: content parts of type '{which}' are not supported.",
                )
        return "\n".join(texts)
    return None


def struct_to_python(struct, param: str) -> dict[str, Any]:
    """A Struct as plain Python, its keys sorted; whole numbers come back as ints (Struct stores every
    number as a double). One that JSON cannot carry (an infinite or NaN number, nesting past the
    interpreter's depth) is an INVALID_ARGUMENT naming `param`.

    Sorted, because a Struct has no order: protobuf's map iterates in an order seeded per process,
    and a schema's key order reaches the output (the prompt renders tools' schemas; the model writes
    JSON properties in schema order). Sorting makes it the same in every process."""

    def restore(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        if isinstance(value, dict):
            return {k: restore(value[k]) for k in sorted(value)}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    try:
        return restore(json_format.MessageToDict(struct))
    except (ValueError, RecursionError) as error:
        reason = "is nested too deeply" if isinstance(error, RecursionError) else "holds a number JSON cannot carry"
        raise InvalidArgument(param, f"'{param}' {reason}.") from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _integer_within_double(text: str) -> int:
    value = int(text)
    if abs(value) > 2**1023:  # as a Struct, the schema's other form, would hold it: a double
        raise ValueError(f"the integer {text[:20]}... is past a double's range")
    return value


def _finite_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 reads as infinity, which JSON cannot carry on
        raise ValueError(f"the number {text[:20]} is past a double's range")
    return value


def json_object_from_text(text: str, param: str) -> dict[str, Any]:
    """A JSON object given as text, its key order kept (what a client wrote, the order the output
    follows); INVALID_ARGUMENT naming `param` when it is not one JSON can carry."""
    try:
        value = json.loads(
            text, parse_constant=_refuse_constant, parse_int=_integer_within_double, parse_float=_finite_number
        )
    except RecursionError:
        raise InvalidArgument(param, f"'{param}' is nested too deeply.") from None
    except ValueError as error:
        raise InvalidArgument(param, f"'{param}' is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(param, f"'{param}' must be a JSON object.")
    return value


def schema_of(holder, struct_field: str, text_field: str, param: str) -> dict[str, Any] | None:
    """A JSON schema given as a Struct (keys sorted) or as JSON text (order kept); None when neither."""
    if holder.HasField(text_field):
        return json_object_from_text(getattr(holder, text_field), param)
    if holder.HasField(struct_field):
        return struct_to_python(getattr(holder, struct_field), param)
    return None


def schema_bytes(holder, struct_field: str, text_field: str) -> int:
    """The size of a schema in either form, before it is read."""
    if holder.HasField(text_field):
        return len(getattr(holder, text_field).encode())
    return getattr(holder, struct_field).ByteSize()


def check_messages(messages, max_messages: int) -> list[dict[str, Any]]:
    """The messages as the chat template takes them (OpenAI's shape, content as text)."""
    if not messages:
        raise InvalidArgument("messages", "'messages' must hold at least one message.")
    if len(messages) > max_messages:
        raise InvalidArgument(
            "messages", f"'messages' holds {len(messages)} messages; this server takes at most {max_messages}."
        )
    rendered = []
    for i, message in enumerate(messages):
        role = ROLE_NAMES.get(message.role)
        if role is None:
            raise InvalidArgument(
                f"messages[{i}].role", "Each message needs a role: system, developer, user, assistant or tool."
            )
        if message.tool_calls and role != "assistant":
            raise InvalidArgument(f"messages[{i}].tool_calls", "Only assistant messages carry tool_calls.")
        text = _message_text(i, message)
        if text is None and role == "assistant" and message.HasField("refusal"):
            text = message.refusal
        if text is None and not (role == "assistant" and message.tool_calls):
            raise InvalidArgument(f"messages[{i}].content", f"A {role} message needs content.")
        entry: dict[str, Any] = {"role": role, "content": text}
        if message.HasField("name"):
            entry["name"] = message.name
        if role == "tool":
            if not message.tool_call_id:
                raise InvalidArgument(
                    f"messages[{i}].tool_call_id", "A tool message needs the 'tool_call_id' it answers."
                )
            entry["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            calls = []
            for j, call in enumerate(message.tool_calls):
                if not call.id or not call.function.name:
                    raise InvalidArgument(
                        f"messages[{i}].tool_calls[{j}]", "A tool call needs an id and a function name."
                    )
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": call.function.arguments},
                    }
                )
            entry["tool_calls"] = calls
        rendered.append(entry)
    return rendered


def check_response_format(request: chat_pb2.ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema the output must follow, or None for free text."""
    if not request.HasField("response_format"):
        return None
    response_format = request.response_format
    if response_format.type == chat_pb2.RESPONSE_FORMAT_TYPE_TEXT:
        return None
    if response_format.type == chat_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        return JSON_OBJECT_SCHEMA
    if response_format.type == chat_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        spec = response_format.json_schema
        if not response_format.HasField("json_schema") or not spec.name:
            raise InvalidArgument(
                "response_format.json_schema.name", "'response_format' of type 'json_schema' needs json_schema.name."
            )
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", spec.name):  # `$` would let a trailing newline by
            raise InvalidArgument(
                "response_format.json_schema.name",
                f"Invalid schema name {spec.name!r}: use 1 to 64 letters, digits, underscores or dashes.",
            )
        return schema_of(spec, "schema", "schema_json", "response_format.json_schema.schema") or {}
    raise InvalidArgument("response_format", "'response_format' needs a type: text, json_object or json_schema.")


def check_schema_sizes(request: chat_pb2.ChatCompletionRequest, max_schema_bytes: int) -> None:
    """The JSON schemas of tools and response_format together fit the limit (before they are read)."""
    schemas = [
        (f"tools[{i}].function.parameters", schema_bytes(tool.function, "parameters", "parameters_json"))
        for i, tool in enumerate(request.tools)
    ]
    schemas.append(
        (
            "response_format.json_schema.schema",
            schema_bytes(request.response_format.json_schema, "schema", "schema_json"),
        )
    )
    total = 0
    for param, size in schemas:
        total += size
        if total > max_schema_bytes:
            raise InvalidArgument(
                param,
                f"The JSON schemas in 'tools' and 'response_format' take more than {max_schema_bytes} bytes "
                "together, the most this server compiles for one request.",
            )


def check_tools(
    request: chat_pb2.ChatCompletionRequest, max_tools: int
) -> tuple[list[ToolSpec], str, str | None, bool]:
    """(tools, tool_choice mode, named function, parallel_tool_calls)."""
    if len(request.tools) > max_tools:
        raise InvalidArgument(
            "tools", f"'tools' holds {len(request.tools)} tools; this server takes at most {max_tools}."
        )
    tools = []
    for i, tool in enumerate(request.tools):
        if tool.type != "function":
            raise InvalidArgument(
                f"tools[{i}].type", f"Only tools of type 'function' are supported, got {tool.type!r}."
            )
        function = tool.function
        parameters = schema_of(function, "parameters", "parameters_json", f"tools[{i}].function.parameters")
        tools.append(
            check_tool(i, function.name, function.description if function.HasField("description") else None, parameters)
        )
    names = [tool.name for tool in tools]
    if len(set(names)) != len(names):
        raise InvalidArgument("tools", "Function names in 'tools' must be unique.")

    mode, name = ("auto" if tools else "none"), None
    if request.HasField("tool_choice"):
        choice = request.tool_choice
        which = choice.WhichOneof("choice")
        if which == "function_name":
            mode, name = "function", choice.function_name
            if name not in names:
                raise InvalidArgument(
                    "tool_choice", f"'tool_choice' names the function {name!r}, which is not in 'tools'."
                )
        elif choice.mode == chat_pb2.TOOL_CHOICE_MODE_NONE:
            mode = "none"
        elif choice.mode in (chat_pb2.TOOL_CHOICE_MODE_AUTO, chat_pb2.TOOL_CHOICE_MODE_REQUIRED):
            if not tools:
                raise InvalidArgument("tool_choice", "'tool_choice' is only allowed when 'tools' are given.")
            mode = "auto" if choice.mode == chat_pb2.TOOL_CHOICE_MODE_AUTO else "required"
        else:
            raise InvalidArgument("tool_choice", "'tool_choice' must be none, auto, required or a named function.")
    parallel = True
    if request.HasField("parallel_tool_calls"):
        if not tools:
            raise InvalidArgument(
                "parallel_tool_calls", "'parallel_tool_calls' is only allowed when 'tools' are given."
            )
        parallel = request.parallel_tool_calls
    return tools, mode, name, parallel


# The requests that share the sampler's parameters: a chat's and a text completion's.
SamplingRequest = chat_pb2.ChatCompletionRequest | chat_pb2.CompletionRequest


def check_sampling(request: SamplingRequest, limits: RequestLimits) -> SamplingParams:
    """The sampler's parameters that chats and text completions share: penalties, logit_bias
    (its size; its token ids need the model: `check_logit_bias_tokens`), seed, temperature and
    top_p. Log probabilities are asked for differently by each API and left out."""
    frequency_penalty = presence_penalty = 0.0
    if request.HasField("frequency_penalty"):
        frequency_penalty = _check_range("frequency_penalty", request.frequency_penalty, -2.0, 2.0)
    if request.HasField("presence_penalty"):
        presence_penalty = _check_range("presence_penalty", request.presence_penalty, -2.0, 2.0)

    if len(request.logit_bias) > limits.max_logit_bias:
        raise InvalidArgument(
            "logit_bias",
            f"'logit_bias' holds {len(request.logit_bias)} entries; this server takes at most {limits.max_logit_bias}.",
        )
    logit_bias = {}
    for token, bias in request.logit_bias.items():
        _check_range(f"logit_bias.{token}", bias, -100.0, 100.0)
        logit_bias[token] = bias

    temperature = 1.0
    if request.HasField("temperature"):
        temperature = _check_range("temperature", request.temperature, 0.0, 2.0)
    top_p = 1.0
    if request.HasField("top_p"):
        top_p = _check_range("top_p", request.top_p, 0.0, 1.0, low_open=True)
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        logit_bias=logit_bias,
        seed=request.seed if request.HasField("seed") else None,
    )


def check_choices(request: SamplingRequest, max_choices: int) -> int:
    """`n`, within the server's limit."""
    n = requested_choices(request)
    if not 1 <= n <= max_choices:
        raise InvalidArgument("n", f"'n' must be in [1, {max_choices}], got {n}.")
    return n


def check_stop(request: SamplingRequest, limits: RequestLimits) -> list[str]:
    """The stop strings: how many and how long before they are matched at every step."""
    if len(request.stop) > limits.max_stop_strings:
        raise InvalidArgument(
            "stop", f"'stop' takes at most {limits.max_stop_strings} strings, got {len(request.stop)}."
        )
    stop = list(request.stop)
    if any(not s for s in stop):
        raise InvalidArgument("stop", "Stop strings must not be empty.")
    if any(len(s) > limits.max_stop_length for s in stop):
        raise InvalidArgument("stop", f"Stop strings must be at most {limits.max_stop_length} characters long.")
    return stop


def check_streaming(request: SamplingRequest, *, streaming: bool, stream_method: str) -> bool:
    """Whether a stream ends with a usage chunk; `stream` and `stream_options` fit the call
    (`stream_method` is the streaming RPC a unary call that sets `stream` is pointed to)."""
    if request.HasField("stream") and request.stream and not streaming:
        raise InvalidArgument("stream", f"'stream' is true on a unary call: use {stream_method} to stream.")
    if not request.HasField("stream_options"):
        return False
    if not streaming:
        raise InvalidArgument("stream_options", "'stream_options' is only allowed when 'stream' is true.")
    return request.stream_options.include_usage


def check_parameters(
    request: chat_pb2.ChatCompletionRequest, *, streaming: bool, max_choices: int, limits: RequestLimits
) -> CheckedRequest:
    """All checks that need no model, in the order the spec lists the fields (the shared sampling
    ones first); sizes before the work they would cost."""
    messages = check_messages(request.messages, limits.max_messages)
    check_schema_sizes(request, limits.max_schema_bytes)
    sampling = check_sampling(request, limits)

    logprobs = request.logprobs if request.HasField("logprobs") else False
    top_logprobs = 0
    if request.HasField("top_logprobs"):
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(
                "top_logprobs", f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {request.top_logprobs}."
            )
        if not logprobs:
            raise InvalidArgument("top_logprobs", "'top_logprobs' needs 'logprobs' set to true.")
        top_logprobs = request.top_logprobs

    max_tokens = None
    max_tokens_param = "max_tokens"
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins when both are set
        if request.HasField(name):
            value = getattr(request, name)
            if value < 1:
                raise InvalidArgument(name, f"'{name}' must be at least 1, got {value}.")
            max_tokens, max_tokens_param = value, name

    n = check_choices(request, max_choices)
    json_schema = check_response_format(request)
    stop = check_stop(request, limits)
    include_usage = check_streaming(request, streaming=streaming, stream_method="StreamChatCompletion")

    tools, tool_choice, tool_name, parallel_tool_calls = check_tools(request, limits.max_tools)
    if json_schema is not None and tool_choice == "auto":
        raise InvalidArgument("response_format", "A JSON 'response_format' cannot be combined with tool_choice 'auto'.")

    return CheckedRequest(
        messages=messages,
        max_tokens=max_tokens,
        max_tokens_param=max_tokens_param,
        stop=stop,
        sampling=replace(sampling, logprobs=logprobs, top_logprobs=top_logprobs),
        include_usage=include_usage,
        n=n,
        json_schema=json_schema,
        tools=tools,
        tool_choice=tool_choice,
        tool_name=tool_name,
        parallel_tool_calls=parallel_tool_calls,
    )


def least_prompt_tokens(messages: list[dict[str, Any]], longest_token_bytes: int) -> int:
    """A lower bound of the prompt's length in tokens, without rendering or tokenizing it.

    The messages' text is all in the prompt (a chat template adds to it, and does not drop a
    message's content), and it has at least as many bytes as characters; no token covers more
    than `longest_token_bytes` of them. So a prompt far beyond the context is refused for the cost
    of summing string lengths, and one of millions of tokens is never tokenized."""
    return least_tokens(sum(len(message["content"] or "") for message in messages), longest_token_bytes)


def least_tokens(characters: int, longest_token_bytes: int) -> int:
    """A lower bound of the tokens that text of `characters` characters takes (least_prompt_tokens)."""
    return -(-characters // longest_token_bytes)


@dataclass(frozen=True)
class Capabilities:
    """What a served model supports beyond plain text."""

    tools: bool = True
    json: bool = True


def check_logit_bias_tokens(sampling: SamplingParams, model: LoadedModel) -> None:
    """Each token id of logit_bias is in the model's vocabulary."""
    for token in sampling.logit_bias:
        if not 0 <= token < model.vocab_size:
            raise InvalidArgument(
                "logit_bias", f"Token id {token} in 'logit_bias' is not in the vocabulary [0, {model.vocab_size})."
            )


def build_generation(
    checked: CheckedRequest, model: LoadedModel, capabilities: Capabilities, constraints: ConstraintCompiler
) -> Generation:
    """The checks that need the model: its capabilities, token ids in its vocabulary, prompt and budget
    in its context, and the grammar the output must follow."""
    if checked.json_schema is not None and not capabilities.json:
        raise InvalidArgument(
            "response_format", f"The model '{model.model_id}' does not support JSON response formats."
        )
    if checked.tools and not capabilities.tools:
        raise InvalidArgument("tools", f"The model '{model.model_id}' does not support tools.")
    check_logit_bias_tokens(checked.sampling, model)
    context = model.context_per_sequence
    least = least_prompt_tokens(checked.messages, model.longest_token_bytes)
    if least >= context:
        raise InvalidArgument(
            "messages",
            f"This model's maximum context length is {context} tokens, but the messages take at least {least} tokens.",
        )
    grammar = None
    if checked.forces_tool_call:
        schema = forced_call_schema(checked.tools, only=checked.tool_name, parallel=checked.parallel_tool_calls)
        grammar = constraints.from_json_schema(schema, param="tools")
    elif checked.json_schema is not None:
        grammar = constraints.from_json_schema(checked.json_schema, param="response_format")
    prompt_tokens = model.render_prompt(checked.messages, checked.tools if checked.tool_choice != "none" else [])
    if len(prompt_tokens) >= context:
        raise InvalidArgument(
            "messages",
            f"This model's maximum context length is {context} tokens, "
            f"but the messages take {len(prompt_tokens)} tokens.",
        )
    room = context - len(prompt_tokens)
    if checked.max_tokens is not None and checked.max_tokens > room:
        raise InvalidArgument(
            checked.max_tokens_param,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{len(prompt_tokens) + checked.max_tokens} tokens ({len(prompt_tokens)} in the messages, "
            f"{checked.max_tokens} in the completion).",
        )
    return Generation(
        prompt_tokens=prompt_tokens,
        max_new_tokens=checked.max_tokens if checked.max_tokens is not None else room,
        stop=checked.stop,
        sampling=checked.sampling,
        n=checked.n,
        grammar=grammar,
    )
