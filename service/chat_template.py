"""Chat templates: the conversation rendered into the prompt text the model was trained on.

A model's GGUF usually carries its Jinja template in `tokenizer.chat_template`, and that one is used.
Some files carry none (the embedded Gemma 3 270M among them); for those a built-in template for the
architecture is used. Built-in templates are Jinja as well, so there is one rendering path.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from service.errors import InvalidArgument

# Gemma's turn format: `<start_of_turn>user|model\n ... <end_of_turn>\n`. Gemma has no system role:
# system (and developer) text is put at the head of the next user turn, as Google's own template does.
_GEMMA_TEMPLATE = """{{- bos_token -}}
{%- set ns = namespace(prefix="") -%}
{%- for message in messages -%}
  {%- if message.role in ("system", "developer") -%}
    {%- set ns.prefix = ns.prefix + (message.content | trim) + "\n\n" -%}
  {%- else -%}
    {{- "<start_of_turn>" + ("model" if message.role == "assistant" else "user") + "\n" -}}
    {%- if message.role != "assistant" -%}{{- ns.prefix -}}{%- set ns.prefix = "" -%}{%- endif -%}
    {{- message.content | trim -}}
    {{- "<end_of_turn>\n" -}}
  {%- endif -%}
{%- endfor -%}
{%- if ns.prefix -%}
  {{- "<start_of_turn>user\n" + (ns.prefix | trim) + "<end_of_turn>\n" -}}
{%- endif -%}
{%- if add_generation_prompt -%}{{- "<start_of_turn>model\n" -}}{%- endif -%}
"""

BUILTIN_TEMPLATES: dict[str, str] = {
    "gemma": _GEMMA_TEMPLATE,
    "gemma2": _GEMMA_TEMPLATE,
    "gemma3": _GEMMA_TEMPLATE,
}


class TemplateError(Exception):
    """The model has no template, or its template cannot be loaded."""


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """Renders OpenAI-style messages (role + text content) into a prompt string."""

    def __init__(self, source: str, *, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        self.source = source
        # A template that mentions `tools` renders them itself; the others get chatrpc's format.
        self.knows_tools = "tools" in source
        self._bos_token = bos_token
        self._eos_token = eos_token

    @classmethod
    def for_model(cls, embedded: str | None, architecture: str, *, bos_token: str, eos_token: str) -> ChatTemplate:
        """The model's own template, else the built-in one for its architecture."""
        source = embedded or BUILTIN_TEMPLATES.get(architecture)
        if source is None:
            raise TemplateError(
                f"the model has no chat template and there is no built-in one for architecture '{architecture}'"
            )
        return cls(source, bos_token=bos_token, eos_token=eos_token)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
            )
        except jinja2.TemplateError as error:
            raise InvalidArgument("messages", f"The model's chat template refused the messages: {error}") from error
