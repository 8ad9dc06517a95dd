"""Checking a ChatCompletionRequest and turning it into what the engine runs.

Every parameter of the spec is either honoured or refused here with INVALID_ARGUMENT naming it,
never silently ignored. The checks that need no model come first (`check_parameters`), then the
ones that need its tokenizer and context size (`build_generation`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatrpc.v1 import chat_pb2
from service.errors import InvalidArgument

if TYPE_CHECKING:
    from service.engine.model import LoadedModel

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20

_ROLE_NAMES = {
    chat_pb2.ROLE_SYSTEM: "system",
    chat_pb2.ROLE_DEVELOPER: "developer",
    chat_pb2.ROLE_USER: "user",
    chat_pb2.ROLE_ASSISTANT: "assistant",
    chat_pb2.ROLE_TOOL: "tool",
}


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


@dataclass(frozen=True)
class CheckedRequest:
    """The request's parameters, checked, before the model is involved."""

    messages: list[dict[str, Any]]
    max_tokens: int | None
    max_tokens_param: str
    stop: list[str]
    sampling: SamplingParams
    include_usage: bool


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


def check_messages(messages) -> list[dict[str, Any]]:  # noqa: ANN001 - a repeated proto field
    if not messages:
        raise InvalidArgument("messages", "'messages' must hold at least one message.")
    rendered = []
    for i, message in enumerate(messages):
        role = _ROLE_NAMES.get(message.role)
        if role is None:
            raise InvalidArgument(f"messages[{i}].role", "Each message needs a role: system, developer, user, assistant or tool.")
        if role == "tool" or message.HasField("tool_call_id"):
            raise InvalidArgument(f"messages[{i}].role", "Tool messages are not supported yet: tools are not supported by this server.")
        if message.tool_calls:
            raise InvalidArgument(f"messages[{i}].tool_calls", "Tool calls are not supported yet by this server.")
        text = _message_text(i, message)
        if text is None:
            if role == "assistant" and message.HasField("refusal"):
                text = message.refusal
            else:
                raise InvalidArgument(f"messages[{i}].content", f"A {role} message needs content.")
        entry: dict[str, Any] = {"role": role, "content": text}
        if message.HasField("name"):
            entry["name"] = message.name
        rendered.append(entry)
    return rendered


def check_parameters(request: chat_pb2.ChatCompletionRequest, *, streaming: bool) -> CheckedRequest:
    """All checks that need no model, in the order the spec lists the fields."""
    messages = check_messages(request.messages)

    frequency_penalty = presence_penalty = 0.0
    if request.HasField("frequency_penalty"):
        frequency_penalty = _check_range("frequency_penalty", request.frequency_penalty, -2.0, 2.0)
    if request.HasField("presence_penalty"):
        presence_penalty = _check_range("presence_penalty", request.presence_penalty, -2.0, 2.0)

    logit_bias = {}
    for token, bias in request.logit_bias.items():
        _check_range(f"logit_bias.{token}", bias, -100.0, 100.0)
        logit_bias[token] = bias

    logprobs = request.logprobs if request.HasField("logprobs") else False
    top_logprobs = 0
    if request.HasField("top_logprobs"):
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument("top_logprobs", f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {request.top_logprobs}.")
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

    if request.HasField("n") and request.n != 1:
        if request.n < 1:
            raise InvalidArgument("n", f"'n' must be at least 1, got {request.n}.")
        raise InvalidArgument("n", "'n' greater than 1 is not supported yet by this server.")

    if request.HasField("response_format") and request.response_format.type != chat_pb2.RESPONSE_FORMAT_TYPE_TEXT:
        if request.response_format.type == chat_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED:
            raise InvalidArgument("response_format", "'response_format' needs a type.")
        raise InvalidArgument("response_format", "Only 'response_format' of type 'text' is supported yet by this server.")

    seed = request.seed if request.HasField("seed") else None

    stop = list(request.stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument("stop", f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}.")
    if any(not s for s in stop):
        raise InvalidArgument("stop", "Stop strings must not be empty.")

    if request.HasField("stream") and request.stream and not streaming:
        raise InvalidArgument("stream", "'stream' is true on a unary call: use StreamChatCompletion to stream.")
    include_usage = False
    if request.HasField("stream_options"):
        if not streaming:
            raise InvalidArgument("stream_options", "'stream_options' is only allowed when 'stream' is true.")
        include_usage = request.stream_options.include_usage

    temperature = 1.0
    if request.HasField("temperature"):
        temperature = _check_range("temperature", request.temperature, 0.0, 2.0)

    if request.HasField("tool_choice") and request.tool_choice.mode != chat_pb2.TOOL_CHOICE_MODE_NONE:
        raise InvalidArgument("tool_choice", "'tool_choice' is not supported yet by this server (only 'none').")
    if request.tools:
        raise InvalidArgument("tools", "'tools' are not supported yet by this server.")
    if request.HasField("parallel_tool_calls"):
        raise InvalidArgument("parallel_tool_calls", "'parallel_tool_calls' is only allowed when 'tools' are given.")

    top_p = 1.0
    if request.HasField("top_p"):
        top_p = _check_range("top_p", request.top_p, 0.0, 1.0, low_open=True)

    sampling = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        logit_bias=logit_bias,
        seed=seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    return CheckedRequest(messages=messages, max_tokens=max_tokens, max_tokens_param=max_tokens_param, stop=stop, sampling=sampling, include_usage=include_usage)


def build_generation(checked: CheckedRequest, model: "LoadedModel") -> Generation:
    """The checks that need the model: token ids in its vocabulary, prompt and budget in its context."""
    for token in checked.sampling.logit_bias:
        if not 0 <= token < model.vocab_size:
            raise InvalidArgument("logit_bias", f"Token id {token} in 'logit_bias' is not in the vocabulary [0, {model.vocab_size}).")
    prompt_tokens = model.render_prompt(checked.messages)
    context = model.context_per_sequence
    if len(prompt_tokens) >= context:
        raise InvalidArgument(
            "messages",
            f"This model's maximum context length is {context} tokens, but the messages take {len(prompt_tokens)} tokens.",
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
    )
