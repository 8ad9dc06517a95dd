"""JSON <-> proto for the legacy Completions API (POST /v1/completions), with translate.py's rules.

Requests: ``completion_request_from_json`` turns the JSON object into a
``chatrpc.v1.CompletionRequest``. As for a chat (translate.py, whose type checks it uses), only JSON
types and shapes are checked here, each failure a 400 naming the field, an unknown field included;
value ranges are the gRPC service's to check. OpenAI's ``prompt`` is a string, a list of strings, a
list of token ids or a list of such lists; a list holds a batch of prompts, and the service takes
one prompt per request: a list of one string or of one list of ids is that prompt, a longer list is
refused with a 400 naming ``prompt``.

Responses: ``text_completion_to_json`` builds the ``text_completion`` object, whole or a chunk of a
stream (OpenAI uses the same object for both).
"""

from __future__ import annotations

from adapters.rest.errors import invalid_request
from adapters.rest.translate import (
    _FINISH_REASONS,
    _INT32,
    _INT64,
    _boolean,
    _bounded_integer,
    _describe,
    _integer,
    _logit_bias,
    _logprob_value,
    _missing,
    _model,
    _number,
    _scalar,
    _stop,
    _stream_options,
    _string,
    _usage,
)
from chatrpc.v1 import chat_pb2 as pb

__all__ = ["completion_request_from_json", "text_completion_to_json"]

_PROMPT_TYPES = "one of a string, array of strings, array of integers, or array of arrays of integers"


# ---------------------------------------------------------------------------
# Request: JSON -> chatrpc.v1.CompletionRequest
# ---------------------------------------------------------------------------


def _token_ids(request: pb.CompletionRequest, values: list, param: str) -> None:
    request.tokens.SetInParent()  # an empty list is still "a prompt of token ids" (the service refuses it)
    request.tokens.ids.extend(_integer(value, f"{param}[{index}]", _INT32) for index, value in enumerate(values))


def _prompt(request: pb.CompletionRequest, value: object) -> None:
    if type(value) is str:
        request.text = _string(value, "prompt")
        return
    if type(value) is not list:
        raise invalid_request(
            f"Invalid type for 'prompt': expected {_PROMPT_TYPES}, but got {_describe(value)} instead.",
            param="prompt",
            code="invalid_type",
        )
    items = value
    if not items:
        raise invalid_request("Invalid 'prompt': empty array. Expected a prompt.", param="prompt", code="invalid_value")
    first = items[0]
    if type(first) is int:
        _token_ids(request, items, "prompt")
    elif type(first) not in (str, list):
        raise invalid_request(
            f"Invalid type for 'prompt[0]': expected a string or an array of integers, but got {_describe(first)} "
            "instead.",
            param="prompt[0]",
            code="invalid_type",
        )
    elif len(items) > 1:
        raise invalid_request(
            f"Invalid 'prompt': a batch of {len(items)} prompts. This server takes one prompt per request.",
            param="prompt",
            code="invalid_value",
        )
    elif type(first) is str:
        request.text = _string(first, "prompt[0]")
    else:
        _token_ids(request, first, "prompt[0]")


# Every top-level field of OpenAI's Completions request. Each entry sets one proto field.
_FIELDS = {
    "model": _model,
    "prompt": _prompt,
    "best_of": _bounded_integer("best_of", _INT32),
    "echo": _scalar("echo", _boolean),
    "frequency_penalty": _scalar("frequency_penalty", _number),
    "logit_bias": _logit_bias,
    "logprobs": _bounded_integer("logprobs", _INT32),
    "max_tokens": _bounded_integer("max_tokens", _INT32),
    "n": _bounded_integer("n", _INT32),
    "presence_penalty": _scalar("presence_penalty", _number),
    "seed": _bounded_integer("seed", _INT64),
    "stop": _stop,
    "stream": _scalar("stream", _boolean),
    "stream_options": _stream_options,
    "suffix": _scalar("suffix", _string),
    "temperature": _scalar("temperature", _number),
    "top_p": _scalar("top_p", _number),
    "user": _scalar("user", _string),
}
# The fields a request must give (not null).
REQUIRED_FIELDS = ("model", "prompt")


def completion_request_from_json(body: dict) -> pb.CompletionRequest:
    """The request body (a JSON object) as a proto; raises a 400 ``APIError`` naming the field."""
    request = pb.CompletionRequest()
    for key, value in body.items():
        assign = _FIELDS.get(key)
        if assign is None:
            raise invalid_request(f"Unrecognized request argument supplied: {key}", param=key)
        if value is not None:
            assign(request, value)
    if body.get("model") is None:
        raise invalid_request("you must provide a model parameter", param="model", code="missing_required_parameter")
    if body.get("prompt") is None:
        raise _missing("prompt")
    return request


# ---------------------------------------------------------------------------
# Response: proto -> JSON
# ---------------------------------------------------------------------------


def _text_logprobs(choice: pb.CompletionChoice) -> dict | None:
    if not choice.HasField("logprobs"):
        return None
    logprobs = choice.logprobs
    top_logprobs = []
    for position in logprobs.top_logprobs:
        # JSON spells a position's alternatives as an object keyed by their text: of two
        # alternatives with the same text (a byte token shown as U+FFFD), the more likely one stays.
        alternatives: dict[str, float] = {}
        for alternative in position.tokens:
            alternatives.setdefault(alternative.token, _logprob_value(alternative.logprob))
        top_logprobs.append(alternatives)
    return {
        "tokens": list(logprobs.tokens),
        "token_logprobs": [_logprob_value(logprob) for logprob in logprobs.token_logprobs],
        "top_logprobs": top_logprobs,
        "text_offset": list(logprobs.text_offset),
    }


def text_completion_to_json(completion: pb.Completion, include_usage: bool = True) -> dict:
    """A ``Completion`` as the API's ``text_completion`` object.

    A whole completion always has ``usage``. In a stream, as for a chat (translate.py:
    chunk_to_json), ``usage`` appears only when the request set ``stream_options.include_usage``:
    null in every chunk but the last, which has no choices and the usage of the whole request.
    """
    result = {
        "id": completion.id,
        "object": completion.object or "text_completion",
        "created": completion.created,
        "model": completion.model,
        "system_fingerprint": completion.system_fingerprint if completion.HasField("system_fingerprint") else None,
        "choices": [
            {
                "index": choice.index,
                "text": choice.text,
                "logprobs": _text_logprobs(choice),
                "finish_reason": _FINISH_REASONS.get(choice.finish_reason),
            }
            for choice in completion.choices
        ],
    }
    if completion.HasField("usage"):
        result["usage"] = _usage(completion.usage)
    elif include_usage:
        result["usage"] = None
    return result
