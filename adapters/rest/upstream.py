"""The gRPC service behind the adapter: one shared channel, per-call metadata, and cancellation.

Every HTTP request that reaches the service makes one gRPC call on the channel opened at startup.
The call carries the client's ``Authorization`` header unchanged (the service checks keys) and the
request id that the HTTP answer echoes (the client's ``X-Request-Id`` or a new one), which the
service writes on its log lines about the call. The call is cancelled as soon as the HTTP
client disconnects: a watcher task waits for the ASGI ``http.disconnect`` message, which the server
sends only once the client is gone (the body has already been read), and cancels the call.

When the service goes away (a crash, a restart) every call fails at once with UNAVAILABLE, a 503 for
the client, and the channel keeps trying to reconnect by itself; the attempts are at most a second
apart, so that the adapter serves again about as soon as the service does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.requests import Request

from adapters.rest.errors import APIError, from_rpc_error
from adapters.rest.metrics import upstream_failed
from adapters.rest.routing import SESSION_HEADER, Routing, service_config, session_affinity
from chatrpc import tracing
from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from chatrpc.v1.wire import (
    AFFINITY_METADATA_KEY,
    AUTHORIZATION_METADATA_KEY,
    REQUEST_ID_METADATA_KEY,
    TRACE_CONTEXT_METADATA_KEYS,
    new_request_id,
    usable_request_id,
)

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_SCOPE_KEY = "chatrpc.request_id"
_WHOLE_SERVER = ""
_SERVING = health_pb2.HealthCheckResponse.SERVING
CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatCompletions"].full_name
_CHAT_METHOD = "/" + CHAT_SERVICE + "/{}"
# gRPC's default back-off between attempts to reconnect grows to two minutes: after a restart of the
# service the adapter would go on answering 503 for as long. The service is one known address, and an
# attempt on it costs one connect.
_RECONNECT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class ClientDisconnected(Exception):
    """The HTTP client went away before the answer was ready; the gRPC call was cancelled."""


class Upstream:
    """The channel to the chatrpc gRPC service and its stubs, shared by all requests."""

    def __init__(
        self,
        target: str,
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        routing: Routing = Routing.PREFIX,
    ) -> None:
        """``target``: any gRPC target, one replica or several (routing.py picks one per call);
        ``credentials``: TLS (chatrpc/tls.py) for a service that speaks it; None: plaintext."""
        self.target = target
        balancing = (("grpc.service_config", service_config(routing)),)
        # The caller's options win.
        merged = list({**dict(_RECONNECT_OPTIONS), **dict(balancing), **dict(options)}.items())
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=merged)
        else:
            self.channel = grpc.aio.secure_channel(target, credentials, options=merged)
        self.chat = chat_pb2_grpc.ChatCompletionsStub(self.channel)
        # The chat and text completion calls send the request's bytes as body.py made them (a large
        # one in a worker process), rather than serializing a proto on the event loop.
        self.create_chat_completion = self.channel.unary_unary(
            _CHAT_METHOD.format("CreateChatCompletion"),
            response_deserializer=chat_pb2.ChatCompletion.FromString,
            _registered_method=True,
        )
        self.stream_chat_completion = self.channel.unary_stream(
            _CHAT_METHOD.format("StreamChatCompletion"),
            response_deserializer=chat_pb2.ChatCompletionChunk.FromString,
            _registered_method=True,
        )
        self.create_completion = self.channel.unary_unary(
            _CHAT_METHOD.format("CreateCompletion"),
            response_deserializer=chat_pb2.Completion.FromString,
            _registered_method=True,
        )
        self.stream_completion = self.channel.unary_stream(
            _CHAT_METHOD.format("StreamCompletion"),
            response_deserializer=chat_pb2.Completion.FromString,
            _registered_method=True,
        )
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def is_serving(self, service: str = _WHOLE_SERVER, timeout: float = 2.0) -> bool:
        """Whether the service's standard health check says SERVING for ``service`` ("": the whole
        server; the service sets its chat service's status once its models are loaded)."""
        try:
            response = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return response.status == _SERVING


def _valid_metadata_value(value: str) -> bool:
    # gRPC refuses (with an opaque error) metadata values outside printable ASCII; HTTP allows more.
    return value.isascii() and value.isprintable()


def request_id(request: Request) -> str:
    """The client's ``x-request-id``, or a new one; the same for the whole HTTP request."""
    scope = request.scope
    value = scope.get(REQUEST_ID_SCOPE_KEY)
    if value is None:
        value = request.headers.get(REQUEST_ID_HEADER)
        if not usable_request_id(value):
            value = new_request_id()
        scope[REQUEST_ID_SCOPE_KEY] = value
    return value


def trace_context(request: Request) -> tuple[tuple[str, str], ...]:
    """The trace the call continues: the adapter's span for the request when tracing is on
    (tracing.py), else the client's own ``traceparent`` and ``tracestate``, passed on unchanged."""
    if tracing.tracer() is not None:
        return tuple(tracing.inject().items())
    return tuple(
        (key, value)
        for key in TRACE_CONTEXT_METADATA_KEYS
        if (value := request.headers.get(key)) is not None and _valid_metadata_value(value)
    )


def call_metadata(request: Request, affinity: str | None = None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for a call made on behalf of ``request``: its request id, trace context,
    credentials, and for a chat or text completion the key that picks its replica (``affinity``:
    the hash of the conversation's or the prompt's beginning, which the client's ``X-Session-Id``
    overrides; routing.py)."""
    identity = ((REQUEST_ID_METADATA_KEY, request_id(request)), *trace_context(request))
    if affinity is not None:
        affinity = session_affinity(request.headers.get(SESSION_HEADER)) or affinity
        identity = (*identity, (AFFINITY_METADATA_KEY, affinity))
    authorization = request.headers.get("authorization")
    if authorization is None:
        return identity
    if not _valid_metadata_value(authorization):
        raise APIError(
            401,
            "The Authorization header holds characters that an API key cannot contain.",
            code="invalid_api_key",
        )
    return (*identity, (AUTHORIZATION_METADATA_KEY, authorization))


class DisconnectWatch:
    """Cancels ``call`` when the HTTP client disconnects; ``stop()`` once the answer is sent."""

    __slots__ = ("_task",)

    def __init__(self, request: Request, call: grpc.aio.Call) -> None:
        # The watching coroutine gets what it needs, not this object: a cancelled task keeps its
        # CancelledError, whose traceback holds the coroutine's frame, so a frame that referred back
        # to the task would make a reference cycle of every request's objects (its task, frames,
        # gRPC call, uvicorn's request cycle) that only the cyclic garbage collector frees, long
        # after, and the adapter's memory would rise with the load until it ran.
        self._task = asyncio.create_task(_cancel_on_disconnect(request.receive, call))

    def client_gone(self) -> bool:
        """After the call raised CancelledError: whether that was the client leaving (and not this
        task being cancelled, which must propagate)."""
        watcher = self._task
        disconnected = watcher.done() and not watcher.cancelled() and watcher.exception() is None and watcher.result()
        task = asyncio.current_task()
        return disconnected and (task is None or task.cancelling() == 0)

    def stop(self) -> None:
        self._task.cancel()


async def _cancel_on_disconnect(receive, call: grpc.aio.Call) -> bool:
    """Waits for the ASGI ``http.disconnect`` message, then cancels ``call``; True once it has."""
    while (await receive())["type"] != "http.disconnect":
        pass
    call.cancel()
    return True


async def unary_call(request: Request, method: grpc.aio.UnaryUnaryMultiCallable, message, affinity: str | None = None):
    """Makes a unary call for ``request``; raises ``APIError`` on an error status and
    ``ClientDisconnected`` (after cancelling the call) when the client leaves first."""
    call = method(message, metadata=call_metadata(request, affinity))
    watch = DisconnectWatch(request, call)
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        upstream_failed(error)
        raise from_rpc_error(error) from None
    except asyncio.CancelledError:
        if watch.client_gone():
            raise ClientDisconnected from None
        raise
    finally:
        watch.stop()
