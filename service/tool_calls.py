"""Tools: how they reach the prompt, the schema that forces a call, and reading calls back.

Templates that know tools (an embedded Jinja template that uses `tools`) get them natively. For the
others, chatrpc's built-in format is used: a system instruction lists the tools as JSON and asks for
a reply of exactly

    {"tool_calls": [{"name": "<function>", "arguments": {...}}]}

Earlier assistant tool calls are written back into the history in that same format, and tool results
become user turns. `tool_choice` "required" or a named function forces that reply by constrained
decoding against `forced_call_schema`; "auto" lets the model choose, and a reply in that format is
read back as tool calls.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from service.errors import InvalidArgument

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch: `$` would let a trailing newline by
# The most calls one reply may make with parallel_tool_calls: a model that repeats itself must still
# close the reply.
MAX_PARALLEL_CALLS = 8


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call."""

    name: str
    description: str | None
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ParsedCall:
    """A tool call read from the model's output."""

    id: str
    name: str
    arguments: str  # JSON text


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def check_tool(index: int, name: str, description: str | None, parameters: dict[str, Any] | None) -> ToolSpec:
    if not FUNCTION_NAME.fullmatch(name):
        raise InvalidArgument(
            f"tools[{index}].function.name",
            f"Invalid function name {name!r}: use 1 to 64 letters, digits, underscores or dashes.",
        )
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if parameters.get("type", "object") != "object":
        raise InvalidArgument(
            f"tools[{index}].function.parameters", "Function parameters must be a JSON schema of type 'object'."
        )
    return ToolSpec(name=name, description=description, parameters=parameters)


def forced_call_schema(tools: list[ToolSpec], *, only: str | None, parallel: bool) -> dict[str, Any]:
    """The JSON schema of a reply that calls tools: one call, or one or more when `parallel`."""
    choices = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
        if only is None or tool.name == only
    ]
    call = choices[0] if len(choices) == 1 else {"anyOf": choices}
    calls: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
    calls["maxItems"] = MAX_PARALLEL_CALLS if parallel and only is None else 1
    return {
        "type": "object",
        "properties": {"tool_calls": calls},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }


def tool_instruction(tools: list[ToolSpec]) -> str:
    """The system text that presents the tools to a model whose template does not know them."""
    listing = json.dumps([tool.as_openai()["function"] for tool in tools], ensure_ascii=False)
    return (
        "You can call these functions:\n"
        f"{listing}\n"
        'To call functions, reply with only this JSON: {"tool_calls": [{"name": "<function name>", '
        '"arguments": {<arguments>}}]}. Otherwise reply normally.'
    )


def _call_text(tool_calls: list[dict[str, Any]]) -> str:
    calls = []
    for call in tool_calls:
        function = call["function"]
        try:
            arguments = json.loads(function["arguments"]) if function["arguments"] else {}
        except json.JSONDecodeError:
            arguments = function["arguments"]
        calls.append({"name": function["name"], "arguments": arguments})
    return json.dumps({"tool_calls": calls}, ensure_ascii=False)


def messages_for_builtin_format(messages: list[dict[str, Any]], tools: list[ToolSpec]) -> list[dict[str, Any]]:
    """Rewrite tool traffic as plain turns, for templates that do not know tools."""
    names_by_id = {}
    rendered: list[dict[str, Any]] = []
    if tools:
        rendered.append({"role": "system", "content": tool_instruction(tools)})
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            for call in message["tool_calls"]:
                names_by_id[call["id"]] = call["function"]["name"]
            text = (message.get("content") or "").strip()
            call_text = _call_text(message["tool_calls"])
            rendered.append({"role": "assistant", "content": f"{text}\n{call_text}" if text else call_text})
        elif message["role"] == "tool":
            name = names_by_id.get(message["tool_call_id"], "the function")
            rendered.append(
                {"role": "user", "content": f"Result of {name} (call {message['tool_call_id']}):\n{message['content']}"}
            )
        else:
            rendered.append(message)
    return rendered


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_calls(text: str, tools: list[ToolSpec]) -> list[ParsedCall] | None:
    """The tool calls in a reply in the built-in format, or None if the reply is not one."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    if not body.startswith("{"):
        return None
    try:
        reply = json.loads(body)
    except json.JSONDecodeError:
        return None
    calls = reply.get("tool_calls") if isinstance(reply, dict) else None
    if not isinstance(calls, list) or not calls:
        return None
    known = {tool.name for tool in tools}
    parsed = []
    for call in calls:
        if not isinstance(call, dict) or call.get("name") not in known:
            return None
        arguments = call.get("arguments", {})
        parsed.append(ParsedCall(new_call_id(), call["name"], json.dumps(arguments, ensure_ascii=False)))
    return parsed


def may_be_calls(text: str) -> bool:
    """Whether streamed text so far could still turn out to be a tool-call reply (then hold it back)."""
    stripped = text.lstrip()
    return not stripped or stripped.startswith("{") or stripped.startswith("`")
