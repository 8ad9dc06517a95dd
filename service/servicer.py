"""The ChatCompletions gRPC servicer: unpack the request, run it on the engine, pack the answer.

Errors are `ServiceError`s raised anywhere below; they become a gRPC status in `_errors_to_status`.
When the client cancels or its deadline passes, grpc.aio cancels the handler and the `finally`
cancels the sequence, which the scheduler frees at its next step.
"""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from service import responses
from service.errors import ServiceError, abort_with
from service.models import ModelRegistry
from service.request import build_generation, check_parameters

log = logging.getLogger(__name__)


class GenerationFailed(ServiceError):
    code = grpc.StatusCode.INTERNAL


class ShuttingDown(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


def _errors_to_status(handler):  # noqa: ANN001, ANN202 - decorator over unary and streaming handlers
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def streaming(self, request, context):  # noqa: ANN001
            try:
                async for item in handler(self, request, context):
                    yield item
            except ServiceError as error:
                await abort_with(context, error)

        return streaming

    @functools.wraps(handler)
    async def unary(self, request, context):  # noqa: ANN001
        try:
            return await handler(self, request, context)
        except ServiceError as error:
            await abort_with(context, error)

    return unary


class ChatCompletionsServicer(chat_pb2_grpc.ChatCompletionsServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def _start(self, request: chat_pb2.ChatCompletionRequest, *, streaming: bool):  # noqa: ANN202
        checked = check_parameters(request, streaming=streaming)
        served = self._registry.get(request.model)
        generation = build_generation(checked, served.model)
        stream = served.scheduler.submit(generation)
        header = responses.CompletionHeader.new(request.model, served.model.system_fingerprint)
        return checked, generation, stream, header

    @_errors_to_status
    async def CreateChatCompletion(self, request, context):  # noqa: ANN001, N802 - gRPC method name
        checked, generation, stream, header = self._start(request, streaming=False)
        texts: list[str] = []
        logprobs = [] if checked.sampling.logprobs else None
        try:
            async for update in stream.updates():
                if update.error is not None:
                    raise _failure(update.error)
                texts.append(update.text)
                if logprobs is not None and update.logprobs:
                    logprobs.extend(update.logprobs)
                if update.finish_reason is not None:
                    return responses.completion(
                        header,
                        text="".join(texts),
                        finish_reason=update.finish_reason,
                        logprobs=logprobs,
                        prompt_tokens=len(generation.prompt_tokens),
                        completion_tokens=update.completion_tokens,
                    )
        finally:
            stream.cancel()
        raise GenerationFailed("generation ended without a finish reason")

    @_errors_to_status
    async def StreamChatCompletion(self, request, context):  # noqa: ANN001, N802
        checked, generation, stream, header = self._start(request, streaming=True)
        want_logprobs = checked.sampling.logprobs
        try:
            yield responses.chunk(header, role=True, text="")
            async for update in stream.updates():
                if update.error is not None:
                    raise _failure(update.error)
                if update.text or (want_logprobs and update.logprobs):
                    yield responses.chunk(header, text=update.text, logprobs=update.logprobs if want_logprobs else None)
                if update.finish_reason is not None:
                    yield responses.chunk(header, finish_reason=update.finish_reason)
                    if checked.include_usage:
                        yield responses.usage_chunk(header, len(generation.prompt_tokens), update.completion_tokens)
                    return
        finally:
            stream.cancel()

    async def ListModels(self, request, context):  # noqa: ANN001, N802
        return chat_pb2.ModelList(
            object="list",
            data=[
                chat_pb2.Model(id=model_id, object="model", created=served.created, owned_by=served.owned_by)
                for model_id, served in self._registry.all()
            ],
        )


def _failure(message: str) -> ServiceError:
    if "shutting down" in message:
        return ShuttingDown(message)
    return GenerationFailed(message)
