"""Building the response messages: the whole ChatCompletion and the stream's chunks, and the
Completion messages of a text completion (whole, and chunks)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from chatrpc.v1 import chat_pb2
from chatrpc.v1.wire import FINISH_REASONS
from service.choice_output import ChoiceOutput
from service.completion_output import CompletionOutput
from service.engine.sequence import TokenLogprob, TopToken
from service.tool_calls import ParsedCall


@dataclass(frozen=True)
class CompletionHeader:
    """What every chunk and the whole completion share."""

    id: str
    created: int
    model: str
    system_fingerprint: str

    @classmethod
    def new(cls, model: str, system_fingerprint: str, *, id_prefix: str = "chatcmpl") -> CompletionHeader:
        """``id_prefix``: OpenAI's, "chatcmpl" for a chat completion, "cmpl" for a text completion."""
        return cls(
            id=f"{id_prefix}-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=model,
            system_fingerprint=system_fingerprint,
        )


def logprob_messages(entries: list[TokenLogprob]) -> list[chat_pb2.TokenLogprob]:
    return [
        chat_pb2.TokenLogprob(
            token=e.token,
            logprob=e.logprob,
            bytes=e.token_bytes,
            top_logprobs=[chat_pb2.TopLogprob(token=t.token, logprob=t.logprob, bytes=t.token_bytes) for t in e.top],
        )
        for e in entries
    ]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> chat_pb2.Usage:
    return chat_pb2.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=chat_pb2.PromptTokensDetails(cached_tokens=cached_tokens),
    )


def completion(
    header: CompletionHeader,
    outputs: list[ChoiceOutput],
    *,
    prompt_tokens: int,
    cached_tokens: int,
    with_logprobs: bool,
) -> chat_pb2.ChatCompletion:
    choices = []
    for output in outputs:
        choice = chat_pb2.Choice(
            index=output.index, message=output.message(), finish_reason=FINISH_REASONS[output.finish_reason]
        )
        if with_logprobs:
            choice.logprobs.content.extend(logprob_messages(output.logprobs))
        choices.append(choice)
    return chat_pb2.ChatCompletion(
        id=header.id,
        object="chat.completion",
        created=header.created,
        model=header.model,
        choices=choices,
        usage=usage(prompt_tokens, sum(o.completion_tokens for o in outputs), cached_tokens),
        system_fingerprint=header.system_fingerprint,
        service_tier="default",
    )


def chunk(
    header: CompletionHeader,
    index: int,
    *,
    role: bool = False,
    text: str | None = None,
    finish_reason: str | None = None,
    logprobs: list[TokenLogprob] | None = None,
    tool_calls: list[ParsedCall] | None = None,
) -> chat_pb2.ChatCompletionChunk:
    delta = chat_pb2.Delta(role="assistant" if role else None, content=text)
    for position, call in enumerate(tool_calls or ()):
        delta.tool_calls.add(
            index=position,
            id=call.id,
            type="function",
            function=chat_pb2.FunctionCallDelta(name=call.name, arguments=call.arguments),
        )
    choice = chat_pb2.ChunkChoice(index=index, delta=delta)
    if finish_reason is not None:
        choice.finish_reason = FINISH_REASONS[finish_reason]
    if logprobs is not None:
        choice.logprobs.content.extend(logprob_messages(logprobs))
    return chat_pb2.ChatCompletionChunk(
        id=header.id,
        object="chat.completion.chunk",
        created=header.created,
        model=header.model,
        choices=[choice],
        system_fingerprint=header.system_fingerprint,
        service_tier="default",
    )


def usage_chunk(
    header: CompletionHeader, prompt_tokens: int, completion_tokens: int, cached_tokens: int
) -> chat_pb2.ChatCompletionChunk:
    return chat_pb2.ChatCompletionChunk(
        id=header.id,
        object="chat.completion.chunk",
        created=header.created,
        model=header.model,
        choices=[],
        usage=usage(prompt_tokens, completion_tokens, cached_tokens),
        system_fingerprint=header.system_fingerprint,
        service_tier="default",
    )


# ---------------------------------------------------------------------------
# Text completions
# ---------------------------------------------------------------------------


def text_logprobs(entries: list[TokenLogprob], offsets: list[int]) -> chat_pb2.CompletionLogprobs:
    """OpenAI's parallel lists. As OpenAI does, a position's alternatives hold the generated token
    too when it is not among the most likely (so up to `logprobs` + 1 of them)."""
    logprobs = chat_pb2.CompletionLogprobs(
        tokens=[entry.token for entry in entries],
        token_logprobs=[entry.logprob for entry in entries],
        text_offset=offsets,
    )
    for entry in entries:
        top: list[TopToken] = list(entry.top)
        if all(alternative.token != entry.token for alternative in top):
            top.append(TopToken(entry.token, entry.logprob, entry.token_bytes))
        logprobs.top_logprobs.add(
            tokens=[chat_pb2.TopLogprob(token=t.token, logprob=t.logprob, bytes=t.token_bytes) for t in top]
        )
    return logprobs


def text_completion(
    header: CompletionHeader,
    outputs: list[CompletionOutput],
    *,
    prompt_tokens: int,
    cached_tokens: int,
    with_logprobs: bool,
) -> chat_pb2.Completion:
    choices = []
    for output in outputs:
        choice = chat_pb2.CompletionChoice(
            index=output.index, text=output.text(), finish_reason=FINISH_REASONS[output.finish_reason]
        )
        if with_logprobs:
            choice.logprobs.CopyFrom(text_logprobs(output.logprobs, output.offsets))
        choices.append(choice)
    return chat_pb2.Completion(
        id=header.id,
        object="text_completion",
        created=header.created,
        model=header.model,
        choices=choices,
        usage=usage(prompt_tokens, sum(o.completion_tokens for o in outputs), cached_tokens),
        system_fingerprint=header.system_fingerprint,
    )


def text_completion_chunk(
    header: CompletionHeader,
    index: int,
    *,
    text: str,
    finish_reason: str | None = None,
    logprobs: chat_pb2.CompletionLogprobs | None = None,
) -> chat_pb2.Completion:
    choice = chat_pb2.CompletionChoice(index=index, text=text, logprobs=logprobs)
    if finish_reason is not None:
        choice.finish_reason = FINISH_REASONS[finish_reason]
    return chat_pb2.Completion(
        id=header.id,
        object="text_completion",
        created=header.created,
        model=header.model,
        choices=[choice],
        system_fingerprint=header.system_fingerprint,
    )


def text_completion_usage_chunk(
    header: CompletionHeader, prompt_tokens: int, completion_tokens: int, cached_tokens: int
) -> chat_pb2.Completion:
    return chat_pb2.Completion(
        id=header.id,
        object="text_completion",
        created=header.created,
        model=header.model,
        choices=[],
        usage=usage(prompt_tokens, completion_tokens, cached_tokens),
        system_fingerprint=header.system_fingerprint,
    )
