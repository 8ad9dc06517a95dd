"""Whether an HTTP answer is one the adapter's OpenAPI document gives, for the tests that hold the
server to it (test_openapi.py, test_fuzz.py).

The document is the committed adapters/rest/openapi.json, which the server serves as it is.
Successful answers must also be accepted by the official `openai` SDK's types.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache

import jsonschema
import openai.types
import openai.types.chat

from adapters.rest.openapi import DOCUMENT_PATH

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# The SDK's type of each successful JSON answer (a model list is checked model by model).
SDK_TYPES = {
    CHAT: openai.types.chat.ChatCompletion,
    COMPLETIONS: openai.types.Completion,
    "/v1/models": openai.types.Model,
    "/v1/models/{model}": openai.types.Model,
}


@cache
def document() -> dict:
    return json.loads(DOCUMENT_PATH.read_text())


def resolve(item: dict) -> dict:
    while "$ref" in item:
        target = document()
        for key in item["$ref"].removeprefix("#/").split("/"):
            target = target[key]
        item = target
    return item


def validate(schema: dict, instance: object) -> None:
    # The schema's references point into the document: its components go beside it.
    jsonschema.validate(
        instance, {**schema, "components": document()["components"]}, cls=jsonschema.Draft202012Validator
    )


def sse_payloads(raw: bytes) -> list[bytes]:
    """The data of each event: sse.py sends every event as one `data: ...` line and a blank line."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    events = raw[:-2].split(b"\n\n")
    assert all(event.startswith(b"data: ") and b"\n" not in event for event in events), raw[:500]
    return [event.removeprefix(b"data: ") for event in events]


def assert_conforms(method: str, path: str, status: int, headers: Mapping[str, str], content: bytes) -> None:
    """The answer (status, ``headers`` by lower-case name, body) is one the document gives for the
    operation ``method`` ``path`` (as the document spells it), and the SDK's types accept a
    successful one."""
    operation = document()["paths"][path][method.lower()]
    assert str(status) in operation["responses"], f"{method} {path}: {status} is not documented: {content[:500]}"
    answer = resolve(operation["responses"][str(status)])
    for name, header in answer["headers"].items():
        assert not resolve(header).get("required") or name in headers, f"{method} {path}: no {name} header"
    media_type = headers["content-type"].split(";")[0].strip()
    assert media_type in answer["content"], f"{method} {path}: {status} as {media_type} is not documented"
    documented = answer["content"][media_type]
    if media_type == "text/event-stream":
        assert_stream_conforms(documented["itemSchema"], content, path)
        return
    body = json.loads(content)
    validate(documented["schema"], body)
    if status == 200 and path in SDK_TYPES:
        for item in body["data"] if path == "/v1/models" else [body]:
            SDK_TYPES[path].model_validate(item)


def assert_stream_conforms(event_schema: dict, content: bytes, path: str = CHAT) -> None:
    payloads = sse_payloads(content)
    data_schema = event_schema["properties"]["data"]["else"]["contentSchema"]
    for payload in payloads:
        validate(event_schema, {"data": payload.decode()})
        if payload != b"[DONE]":
            chunk = json.loads(payload)
            validate(data_schema, chunk)
            if "error" in chunk:
                continue
            if path == COMPLETIONS:
                sdk_accepts_completion_chunk(chunk)
            else:
                openai.types.chat.ChatCompletionChunk.model_validate(chunk)
    # The stream ends with [DONE], or with the error that cut it short.
    assert payloads[-1] == b"[DONE]" or "error" in json.loads(payloads[-1])
    assert b"[DONE]" not in payloads[:-1]


def sdk_accepts_completion_chunk(chunk: dict) -> None:
    """The SDK's Completion type takes the chunk. Its choices' finish_reason is typed as never null,
    yet OpenAI's own streams send null until a choice's last chunk (the SDK builds streamed objects
    without validating them): an unfinished choice is checked as if it had finished."""
    choices = [{**choice, "finish_reason": choice["finish_reason"] or "length"} for choice in chunk["choices"]]
    openai.types.Completion.model_validate({**chunk, "choices": choices})


def stream_errors(content: bytes) -> list[dict]:
    """The error events of a stream (an error after the stream started)."""
    return [json.loads(payload)["error"] for payload in sse_payloads(content) if payload.startswith(b'{"error"')]
