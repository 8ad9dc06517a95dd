"""One choice's output as the client sees it: text, or tool calls read from the text.

The engine produces text. With tools in play the text may be a tool-call reply in chatrpc's built-in
format (see tool_calls.py): when a call is forced, or while the text so far could still become one,
it is held back and read at the end; otherwise it streams as content.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatrpc.v1 import chat_pb2
from service.engine.sequence import SequenceUpdate, TokenLogprob
from service.request import CheckedRequest
from service.tool_calls import ParsedCall, may_be_calls, parse_calls


@dataclass
class StreamPiece:
    """What one update of a choice adds to the stream."""

    text: str | None = None
    tool_calls: list[ParsedCall] | None = None
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class ChoiceOutput:
    """Collects one choice's updates; answers what to stream now and what the whole choice is."""

    index: int
    checked: CheckedRequest
    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    tool_calls: list[ParsedCall] | None = None
    _held: list[str] = field(default_factory=list)
    _streaming_text: bool = False

    @property
    def _reads_tools(self) -> bool:
        return self.checked.tool_choice in ("auto", "required", "function")

    def add(self, update: SequenceUpdate) -> StreamPiece:
        self.texts.append(update.text)
        if update.logprobs:
            self.logprobs.extend(update.logprobs)
        self.completion_tokens = update.completion_tokens
        piece = StreamPiece(logprobs=update.logprobs)
        if self._streaming_text or not self._reads_tools:
            piece.text = update.text
        else:
            self._held.append(update.text)
            held = "".join(self._held)
            if not self.checked.forces_tool_call and not may_be_calls(held):
                self._streaming_text, self._held = True, []
                piece.text = held
        if update.finish_reason is not None:
            self._finish(update.finish_reason)
            piece.finish_reason = self.finish_reason
            if self.tool_calls is not None:
                piece.tool_calls = self.tool_calls
            elif self._held:
                piece.text = (piece.text or "") + "".join(self._held)
            self._held = []
        return piece

    def _finish(self, finish_reason: str) -> None:
        self.finish_reason = finish_reason
        # A reply cut by max_tokens is incomplete JSON: it stays text, as OpenAI leaves it.
        if self._reads_tools and not self._streaming_text and finish_reason == "stop":
            self.tool_calls = parse_calls("".join(self.texts), self.checked.tools)
            if self.tool_calls is not None:
                self.finish_reason = "tool_calls"

    def message(self) -> chat_pb2.ResponseMessage:
        if self.tool_calls is not None:
            return chat_pb2.ResponseMessage(role="assistant", tool_calls=tool_call_messages(self.tool_calls))
        return chat_pb2.ResponseMessage(role="assistant", content="".join(self.texts))


def tool_call_messages(calls: list[ParsedCall]) -> list[chat_pb2.ToolCall]:
    return [
        chat_pb2.ToolCall(id=c.id, type="function", function=chat_pb2.FunctionCall(name=c.name, arguments=c.arguments))
        for c in calls
    ]
