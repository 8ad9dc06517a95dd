"""Building the response messages: the whole ChatCompletion and the stream's chunks."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from chatrpc.v1 import chat_pb2
from service.engine.sequence import TokenLogprob

FINISH_REASONS = {
    "stop": chat_pb2.FINISH_REASON_STOP,
    "length": chat_pb2.FINISH_REASON_LENGTH,
}


@dataclass(frozen=True)
class CompletionHeader:
    """What every chunk and the whole completion share."""

    id: str
    created: int
    model: str
    system_fingerprint: str

    @classmethod
    def new(cls, model: str, system_fingerprint: str) -> "CompletionHeader":
        return cls(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model, system_fingerprint=system_fingerprint)


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


def usage(prompt_tokens: int, completion_tokens: int) -> chat_pb2.Usage:
    return chat_pb2.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def completion(
    header: CompletionHeader,
    *,
    text: str,
    finish_reason: str,
    logprobs: list[TokenLogprob] | None,
    prompt_tokens: int,
    completion_tokens: int,
) -> chat_pb2.ChatCompletion:
    choice = chat_pb2.Choice(
        index=0,
        message=chat_pb2.ResponseMessage(role="assistant", content=text),
        finish_reason=FINISH_REASONS[finish_reason],
    )
    if logprobs is not None:
        choice.logprobs.content.extend(logprob_messages(logprobs))
    return chat_pb2.ChatCompletion(
        id=header.id,
        object="chat.completion",
        created=header.created,
        model=header.model,
        choices=[choice],
        usage=usage(prompt_tokens, completion_tokens),
        system_fingerprint=header.system_fingerprint,
        service_tier="default",
    )


def chunk(
    header: CompletionHeader,
    *,
    role: bool = False,
    text: str | None = None,
    finish_reason: str | None = None,
    logprobs: list[TokenLogprob] | None = None,
) -> chat_pb2.ChatCompletionChunk:
    delta = chat_pb2.Delta(role="assistant" if role else None, content=text)
    choice = chat_pb2.ChunkChoice(index=0, delta=delta)
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


def usage_chunk(header: CompletionHeader, prompt_tokens: int, completion_tokens: int) -> chat_pb2.ChatCompletionChunk:
    return chat_pb2.ChatCompletionChunk(
        id=header.id,
        object="chat.completion.chunk",
        created=header.created,
        model=header.model,
        choices=[],
        usage=usage(prompt_tokens, completion_tokens),
        system_fingerprint=header.system_fingerprint,
        service_tier="default",
    )
