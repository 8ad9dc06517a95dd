"""The ChatCompletions gRPC servicer: unpack the request, run it on the engine, pack the answer.

Errors are `ServiceError`s raised anywhere below, the engine's included (a failed sequence's update
carries one); they become the RPC's status in one place, service/errors.py.
When the client cancels or its deadline passes, grpc.aio cancels the handler and the `finally`
cancels the sequence, which the scheduler frees at its next step.

Checking a request, rendering its prompt, tokenizing it and compiling its grammar run in a worker
thread, never on the event loop, where a large request would hold up every other call
(benchmarks/isolation.py measures it).
"""

from __future__ import annotations

import asyncio

from chatrpc import tracing
from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from service import responses
from service.access_log import CallRecord, access_logged
from service.auth import Tenants
from service.call_spans import record_spans
from service.choice_output import ChoiceOutput
from service.errors import reported_as_status
from service.limits import RequestLimits
from service.metrics import ServiceMetrics
from service.models import ModelRegistry, ServedModel
from service.request import CheckedRequest, Generation, build_generation, check_parameters
from service.request_decoding import UndecodableRequest


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

    def _prepare(
        self, request: chat_pb2.ChatCompletionRequest | UndecodableRequest, streaming: bool
    ) -> tuple[CheckedRequest, ServedModel, Generation]:
        if isinstance(request, UndecodableRequest):
            raise request.error
        checked = check_parameters(
            request, streaming=streaming, max_choices=self._registry.max_choices, limits=self._limits
        )
        served = self._registry.get(request.model)
        return checked, served, build_generation(checked, served.model, served.capabilities, served.constraints)

    async def _start(self, request, context, record: CallRecord, *, streaming: bool):
        model_id = None if isinstance(request, UndecodableRequest) else request.model
        record.model = model_id
        tenant = self._tenants.of(context.invocation_metadata())
        record.api_key = self._tenants.fingerprint(tenant)
        with self._registry.arriving(model_id, tenant):
            checked, served, generation = await asyncio.to_thread(self._prepare, request, streaming)
            stream = served.scheduler.submit(generation, tenant)
        record.prompt_tokens = len(generation.prompt_tokens)
        record.engine = stream.sequences[0]
        header = responses.CompletionHeader.new(request.model, served.model.system_fingerprint)
        outputs = [ChoiceOutput(index, checked) for index in range(checked.n)]
        return checked, generation, stream, header, outputs

    @staticmethod
    def _finish(record: CallRecord, outputs: list[ChoiceOutput]) -> None:
        record.completion_tokens = sum(output.completion_tokens for output in outputs)
        record.finish_reasons = [output.finish_reason or "none" for output in outputs]

    @reported_as_status
    @access_logged
    async def CreateChatCompletion(self, request, context, record: CallRecord):  # noqa: N802 - gRPC method name
        checked, generation, stream, header, outputs = await self._start(request, context, record, streaming=False)
        try:
            async for update in stream.updates():
                if update.error is not None:
                    raise update.error
                record.output_arrived(update.cached_tokens)
                outputs[update.index].add(update)
        finally:
            stream.cancel()
            self._finish(record, outputs)
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
        checked, generation, stream, header, outputs = await self._start(request, context, record, streaming=True)
        want_logprobs = checked.sampling.logprobs
        # A choice's role rides on its first chunk, which goes out with its first text, once the
        # prompt is prefilled: a failure before any token is then a plain error status (an HTTP
        # error through REST, not an error event after a 200), and nothing reaches the client while
        # the model's threads hold every core for the prefill. Its finish_reason rides on its last
        # chunk. Each message saved is a wake-up of the client (and the REST adapter) fewer.
        started = [False] * len(outputs)
        try:
            async for update in stream.updates():
                if update.error is not None:
                    raise update.error
                record.output_arrived(update.cached_tokens)
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
                yield responses.usage_chunk(
                    header, len(generation.prompt_tokens), completion_tokens, record.cached_tokens
                )
        finally:
            stream.cancel()
            self._finish(record, outputs)

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
