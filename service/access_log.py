"""One access line per chat call, and the request id that ties it to the client's.

A call's id is the client's `x-request-id` metadata (the REST adapter always sends its HTTP
request's) or, when a gRPC client sends none or one that is not usable (chatrpc/v1/wire.py:
`usable_request_id`), a new `req_<32 hex>`. The service returns it in the call's
initial metadata, and every log line written while the call is handled carries it (chatrpc/logs.py).

When the call ends, the servicer's `call_ended` gets its record and writes one line at INFO on the
`chatrpc.access` logger that says who (the API key's fingerprint, never the key), what (method,
model), how much (prompt, cached and completion tokens), how long (time to first token, duration)
and how it ended (finish reasons, gRPC status). The request's and the answer's text are never in
it; with --log-format json each of these is a field.
The same record feeds the request metrics (service/metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from chatrpc import tracing
from chatrpc.logs import bind_request_id
from chatrpc.v1.wire import REQUEST_ID_METADATA_KEY, new_request_id, usable_request_id
from service.errors import ServiceError

ACCESS_LOGGER = logging.getLogger("chatrpc.access")


def request_id_of(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The client's request id from the call's metadata if it is usable, else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_METADATA_KEY:
            if isinstance(value, str) and usable_request_id(value):
                return value
            break
    return new_request_id()


class EngineTimes(Protocol):
    """When the engine queued, admitted and first sampled a request (its first choice's Sequence)."""

    queued_at: float
    admitted_at: float | None
    first_token_at: float | None


@dataclass
class CallRecord:
    """What one call's access line reports; the servicer fills in the counts as it learns them."""

    request_id: str
    method: str
    api_key: str | None = None  # the caller's key's fingerprint (service/auth.py)
    started: float = field(default_factory=time.monotonic)
    model: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    first_token: float | None = None
    last_token: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    status: str = "OK"
    engine: EngineTimes | None = None  # None: refused before it was queued
    ended: float | None = None
    trace_context: dict[str, str] | None = None  # the caller's traceparent, when tracing is on

    def output_arrived(self, cached_tokens: int) -> None:
        """An update of the engine's came: the first one's time is the time to first token."""
        self.last_token = time.monotonic()
        if self.first_token is None:
            self.first_token = self.last_token
        self.cached_tokens = max(self.cached_tokens, cached_tokens)

    def end(self) -> None:
        if self.ended is None:
            self.ended = time.monotonic()

    def fields(self) -> dict[str, Any]:
        self.end()
        ended = self.ended
        return {
            "request_id": self.request_id,
            "method": self.method,
            "model": self.model,
            "api_key": self.api_key,
            "status": self.status,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reasons": self.finish_reasons,
            "ttft_ms": None if self.first_token is None else round((self.first_token - self.started) * 1000, 1),
            "duration_ms": round((ended - self.started) * 1000, 1),
        }

    def emit(self) -> None:
        if not ACCESS_LOGGER.isEnabledFor(logging.INFO):
            return
        values = self.fields()
        ACCESS_LOGGER.info(
            "%s %s model=%s key=%s status=%s prompt=%d cached=%d completion=%d finish=%s ttft_ms=%s duration_ms=%s",
            values["request_id"], values["method"], values["model"], values["api_key"], values["status"],
            values["prompt_tokens"], values["cached_tokens"], values["completion_tokens"],
            ",".join(values["finish_reasons"]) or "-", values["ttft_ms"], values["duration_ms"],
            extra=values,
        )  # fmt: skip


def _status_of(error: BaseException) -> str:
    if isinstance(error, ServiceError):
        return error.code.name
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED.name  # the client cancelled, or its deadline passed
    return grpc.StatusCode.UNKNOWN.name


def access_logged(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a servicer method, unary or streaming, that takes a `CallRecord` after its context:
    gives the call its request id (returned in the initial metadata, and on every log line written
    meanwhile) and hands the record to the servicer's `call_ended` when it ends."""
    method = handler.__name__

    async def begin(context: grpc.aio.ServicerContext) -> CallRecord:
        metadata = context.invocation_metadata()
        record = CallRecord(request_id_of(metadata), method)
        if tracing.tracer() is not None:
            record.trace_context = tracing.trace_headers(metadata)
        bind_request_id(record.request_id)
        await context.send_initial_metadata(((REQUEST_ID_METADATA_KEY, record.request_id),))
        return record

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def streaming(self, request, context):
            record = await begin(context)
            try:
                # Closed here, not when it is garbage: a call cancelled while this generator waits at
                # its `yield` would otherwise reach `call_ended` before the handler's own `finally`
                # has cancelled the engine's work and counted the tokens sent.
                async with contextlib.aclosing(handler(self, request, context, record)) as items:
                    async for item in items:
                        yield item
            except BaseException as error:
                record.status = _status_of(error)
                raise
            finally:
                record.end()
                self.call_ended(record)

        return streaming

    @functools.wraps(handler)
    async def unary(self, request, context):
        record = await begin(context)
        try:
            return await handler(self, request, context, record)
        except BaseException as error:
            record.status = _status_of(error)
            raise
        finally:
            record.end()
            self.call_ended(record)

    return unary
