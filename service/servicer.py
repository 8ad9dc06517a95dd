"""The ChatCompletions gRPC servicer: unpack the request, run it on the engine, pack the answer; for
chat completions and for text completions (the legacy Completions API), which differ in how the
prompt is made and the answer packed, and share the rest.

Errors are `ServiceError`s raised anywhere below, the engine's included (a failed sequence's update
carries one); they become the RPC's status in one place, service/errors.py.
When the client cancels or its deadline passes, grpc.aio cancels the handler and the `finally` of
`_updates` cancels the sequence, which the scheduler frees at its next step.

Checking a request, rendering its prompt, tokenizing it and compiling its grammar run in a worker
thread, never on the event loop, where a large request would hold up every other call
(benchmarks/isolation.py measures it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from chatrpc import tracing
from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from service import responses
from service.access_log import CallRecord, access_logged
from service.auth import Tenants
from service.call_spans import record_spans
from service.choice_output import ChoiceOutput
from service.completion_output import CompletionOutput
from service.completion_request import build_completion_generation, check_completion_parameters
from service.engine.scheduler import RequestStream
from service.engine.sequence import SequenceUpdate
from service.errors import reported_as_status
from service.limits import RequestLimits
from service.metrics import ServiceMetrics
from service.models import ModelRegistry, ServedModel
from service.request import Generation, build_generation, check_parameters
from service.request_decoding import UndecodableRequest


@dataclass(frozen=True)
class Prepared:
    """A request checked and made into a Generation for the model it names."""

    checked: Any  # CheckedRequest (request.py) or CheckedCompletion (completion_request.py)
    served: ServedModel
    generation: Generation
    echo_text: str = ""  # a text completion's echoed prompt


class ChatCompletionsServicer(chat_pb2_grpc.ChatCompletionsServicer):
    def __init__(
        self, registry: ModelRegistry, limits: RequestLimits, *, tenants: Tenants, metrics: ServiceMetrics
    ) -> None:
        self._registry = registry
        self._limits = limits
        self._tenants = tenants
        self._metrics = metrics

    def call_ended(self, record: CallRecord) -> None:
        """A chat call's end (access_log.py): its access line, its metrics, and its spans when
        tracing is on."""
        record.emit()
        self._metrics.call_ended(record)
        tracer = tracing.tracer()
        if tracer is not None:
            record_spans(tracer, record)

    def _prepare_chat(self, request: chat_pb2.ChatCompletionRequest | UndecodableRequest, streaming: bool) -> Prepared:
        if isinstance(request, UndecodableRequest):
            raise request.error
        checked = check_parameters(
            request, streaming=streaming, max_choices=self._registry.max_choices, limits=self._limits
        )
        served = self._registry.get(request.model)
        return Prepared(
            checked, served, build_generation(checked, served.model, served.capabilities, served.constraints)
        )

    def _prepare_completion(
        self, request: chat_pb2.CompletionRequest | UndecodableRequest, streaming: bool
    ) -> Prepared:
        if isinstance(request, UndecodableRequest):
            raise request.error
        checked = check_completion_parameters(
            request, streaming=streaming, max_choices=self._registry.max_choices, limits=self._limits
        )
        served = self._registry.get(request.model)
        built = build_completion_generation(checked, served.model)
        return Prepared(checked, served, built.generation, built.echo_text)

    async def _submit(
        self, request, context, record: CallRecord, prepare: Callable[[Any, bool], Prepared], *, streaming: bool
    ) -> tuple[Prepared, RequestStream]:
        """Checks the request (`prepare`, in a worker thread) and queues its generation."""
        model_id = None if isinstance(request, UndecodableRequest) else request.model
        record.model = model_id
        tenant = self._tenants.of(context.invocation_metadata())
        record.api_key = self._tenants.fingerprint(tenant)
        with self._registry.arriving(model_id, tenant):
            prepared = await asyncio.to_thread(prepare, request, streaming)
            stream = prepared.served.scheduler.submit(prepared.generation, tenant)
        record.prompt_tokens = len(prepared.generation.prompt_tokens)
        record.engine = stream.sequences[0]
        return prepared, stream

    async def _start_chat(self, request, context, record: CallRecord, *, streaming: bool):
        prepared, stream = await self._submit(request, context, record, self._prepare_chat, streaming=streaming)
        checked, generation = prepared.checked, prepared.generation
        header = responses.CompletionHeader.new(request.model, prepared.served.model.system_fingerprint)
        outputs = [ChoiceOutput(index, checked) for index in range(checked.n)]
        return checked, generation, stream, header, outputs

    async def _start_completion(self, request, context, record: CallRecord, *, streaming: bool):
        prepared, stream = await self._submit(request, context, record, self._prepare_completion, streaming=streaming)
        fingerprint = prepared.served.model.system_fingerprint
        header = responses.CompletionHeader.new(request.model, fingerprint, id_prefix="cmpl")
        outputs = [CompletionOutput(index, prepared.echo_text) for index in range(prepared.checked.n)]
        return prepared.checked, prepared.generation, stream, header, outputs

    @staticmethod
    def _finish(record: CallRecord, outputs: list[ChoiceOutput] | list[CompletionOutput]) -> None:
        record.completion_tokens = sum(output.completion_tokens for output in outputs)
        record.finish_reasons = [output.finish_reason or "none" for output in outputs]

    async def _updates(
        self, stream: RequestStream, record: CallRecord, outputs: list[ChoiceOutput] | list[CompletionOutput]
    ) -> AsyncIterator[SequenceUpdate]:
        """The request's updates, a failed sequence's error raised. However the call ends (done, an
        error, the client gone), its sequences are cancelled and its outputs go to the access line:
        callers iterate it under `contextlib.aclosing`, so that this happens as they stop."""
        try:
            async for update in stream.updates():
                if update.error is not None:
                    raise update.error
                record.output_arrived(update.cached_tokens)
                yield update
        finally:
            stream.cancel()
            self._finish(record, outputs)

    async def _collect(
        self, stream: RequestStream, record: CallRecord, outputs: list[ChoiceOutput] | list[CompletionOutput]
    ) -> None:
        """A unary call's whole answer: every update into its choice's output."""
        async with contextlib.aclosing(self._updates(stream, record, outputs)) as updates:
            async for update in updates:
                outputs[update.index].add(update)

    @reported_as_status
    @access_logged
    async def CreateChatCompletion(self, request, context, record: CallRecord):  # noqa: N802 - gRPC method name
        checked, generation, stream, header, outputs = await self._start_chat(request, context, record, streaming=False)
        await self._collect(stream, record, outputs)
        return responses.completion(
            header,
            outputs,
            prompt_tokens=len(generation.prompt_tokens),
            cached_tokens=record.cached_tokens,
            with_logprobs=checked.sampling.logprobs,
        )

    @reported_as_status
    @access_logged
    async def StreamChatCompletion(self, request, context, record: CallRecord):  # noqa: N802
        checked, generation, stream, header, outputs = await self._start_chat(request, context, record, streaming=True)
        want_logprobs = checked.sampling.logprobs
        # A choice's role rides on its first chunk, which goes out with its first text, once the
        # prompt is prefilled: a failure before any token is then a plain error status (an HTTP
        # error through REST, not an error event after a 200), and nothing reaches the client while
        # the model's threads hold every core for the prefill. Its finish_reason rides on its last
        # chunk. Each message saved is a wake-up of the client (and the REST adapter) fewer.
        started = [False] * len(outputs)
        async with contextlib.aclosing(self._updates(stream, record, outputs)) as updates:
            async for update in updates:
                piece = outputs[update.index].add(update)
                logprobs = piece.logprobs if want_logprobs else None
                if piece.text or piece.tool_calls or logprobs or piece.finish_reason is not None:
                    first = not started[update.index]
                    started[update.index] = True
                    yield responses.chunk(
                        header, update.index, role=first, text=piece.text or ("" if first else None),
                        tool_calls=piece.tool_calls, logprobs=logprobs, finish_reason=piece.finish_reason,
                    )  # fmt: skip
        if checked.include_usage:
            completion_tokens = sum(o.completion_tokens for o in outputs)
            yield responses.usage_chunk(header, len(generation.prompt_tokens), completion_tokens, record.cached_tokens)

    @reported_as_status
    @access_logged
    async def CreateCompletion(self, request, context, record: CallRecord):  # noqa: N802
        checked, generation, stream, header, outputs = await self._start_completion(
            request, context, record, streaming=False
        )
        await self._collect(stream, record, outputs)
        return responses.text_completion(
            header,
            outputs,
            prompt_tokens=len(generation.prompt_tokens),
            cached_tokens=record.cached_tokens,
            with_logprobs=checked.sampling.logprobs,
        )

    @reported_as_status
    @access_logged
    async def StreamCompletion(self, request, context, record: CallRecord):  # noqa: N802
        checked, generation, stream, header, outputs = await self._start_completion(
            request, context, record, streaming=True
        )
        want_logprobs = checked.sampling.logprobs
        # As for a chat: a choice's first chunk goes out with its first text (after the echoed
        # prompt), once the prompt is prefilled, so that an early failure is a plain error status.
        started = [False] * len(outputs)
        async with contextlib.aclosing(self._updates(stream, record, outputs)) as updates:
            async for update in updates:
                output = outputs[update.index]
                offsets = output.add(update)
                text = update.text if started[update.index] else output.echo + update.text
                logprobs = (
                    responses.text_logprobs(update.logprobs, offsets) if want_logprobs and update.logprobs else None
                )
                if text or logprobs is not None or update.finish_reason is not None:
                    started[update.index] = True
                    yield responses.text_completion_chunk(
                        header, update.index, text=text, finish_reason=update.finish_reason, logprobs=logprobs
                    )
        if checked.include_usage:
            completion_tokens = sum(o.completion_tokens for o in outputs)
            yield responses.text_completion_usage_chunk(
                header, len(generation.prompt_tokens), completion_tokens, record.cached_tokens
            )

    async def ListModels(self, request, context):  # noqa: N802
        return chat_pb2.ModelList(
            object="list",
            data=[
                chat_pb2.Model(
                    id=model_id,
                    object="model",
                    created=served.created,
                    owned_by=served.owned_by,
                    capabilities=chat_pb2.ModelCapabilities(
                        tools=served.capabilities.tools,
                        json_object=served.capabilities.json,
                        json_schema=served.capabilities.json,
                    ),
                )
                for model_id, served in self._registry.all()
            ],
        )
