"""``"stream": true``: the completion (chat or text) as Server-Sent Events, exactly as OpenAI sends them.

Each chunk is ``data: {json}\\n\\n``; the stream ends with ``data: [DONE]\\n\\n``. The first chunk is
awaited before the HTTP response starts, so that an error the service reports up front (a bad
argument, an unknown model) is an ordinary HTTP error with the right status. An error after that is
sent as one ``data: {"error": {...}}\\n\\n`` event that ends the stream. When the client goes away
the gRPC call is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from adapters.rest.body import TranslatedRequest
from adapters.rest.errors import from_rpc_error, internal_error
from adapters.rest.metrics import upstream_failed
from adapters.rest.translate import encode
from adapters.rest.upstream import (
    REQUEST_ID_HEADER,
    ClientDisconnected,
    DisconnectWatch,
    call_metadata,
    request_id,
)

logger = logging.getLogger(__name__)

_DONE = b"data: [DONE]\n\n"
_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Tell a buffering reverse proxy (nginx) to pass each event on at once.
    (b"x-accel-buffering", b"no"),
]


# A chunk (a ChatCompletionChunk or a Completion) as its JSON object, given whether the request
# asked for the usage chunk (translate.py: chunk_to_json, translate_completions.py).
ChunkToJson = Callable[[object, bool], dict]


def _event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


async def open_event_stream(
    request: Request,
    method: grpc.aio.UnaryStreamMultiCallable,
    translated: TranslatedRequest,
    chunk_to_json: ChunkToJson,
) -> EventStreamResponse:
    """Starts the streaming call and waits for its first chunk; raises ``APIError`` if the service
    fails before that and ``ClientDisconnected`` if the client leaves first."""
    call = method(translated.wire, metadata=call_metadata(request, translated.affinity))
    watch = DisconnectWatch(request, call)
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        watch.stop()
        upstream_failed(error)
        raise from_rpc_error(error) from None
    except asyncio.CancelledError:
        watch.stop()
        if watch.client_gone():
            raise ClientDisconnected from None
        call.cancel()
        raise
    except BaseException:
        watch.stop()
        call.cancel()
        raise
    return EventStreamResponse(
        call, watch, first, translated.include_usage, translated.choices, request_id(request), chunk_to_json
    )


class EventStreamResponse:
    """An ASGI response that relays a started ``StreamChatCompletion`` (or ``StreamCompletion``)
    call as SSE."""

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall,
        watch: DisconnectWatch,
        first: object,
        include_usage: bool,
        choices: int,
        request_id: str,
        chunk_to_json: ChunkToJson,
    ) -> None:
        self._call = call
        self._watch = watch
        self._first = first
        self._chunk_to_json = chunk_to_json
        self._include_usage = include_usage
        self._choices = choices
        self._headers = [*_HEADERS, (REQUEST_ID_HEADER.encode(), request_id.encode("latin-1"))]
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call, include_usage = self._call, self._include_usage
        held = b""  # events that go out with the next write
        try:
            chunk, unfinished = self._first, self._choices
            while chunk is not grpc.aio.EOF:
                data = _event(encode(self._chunk_to_json(chunk, include_usage)))
                unfinished -= sum(1 for choice in chunk.choices if choice.finish_reason)
                if chunk.HasField("usage") or (unfinished <= 0 and not include_usage):
                    # The service sends nothing after this chunk but its OK status: the client gets
                    # [DONE] now, in the same write, instead of after the status reaches us. The
                    # watch stops first: once the response is complete, ASGI reports a disconnect.
                    self._watch.stop()
                    await self._write(send, held + data + _DONE, more_body=False)
                    await self._expect_end(call)
                    return
                if unfinished <= 0:
                    # Every choice has finished and only the usage chunk follows, a fraction of a
                    # millisecond later: both go out in one write (one wake-up of the client).
                    held += data
                else:
                    await self._write(send, held + data, more_body=True)
                    held = b""
                chunk = await call.read()
            await self._write(send, held + _DONE, more_body=False)
        except grpc.aio.AioRpcError as error:
            upstream_failed(error)
            await self._write(send, held + _event(from_rpc_error(error).to_json()), more_body=False)
        except asyncio.CancelledError:
            if not self._watch.client_gone():
                raise
        except Exception:
            logger.exception("streaming a completion failed")
            await self._write(send, held + _event(internal_error().to_json()), more_body=False)
        finally:
            self._watch.stop()
            call.cancel()  # a no-op once the call has ended

    async def _write(self, send: Send, body: bytes, *, more_body: bool) -> None:
        # The response starts with its first write rather than before: the first chunk is already
        # here, and the status line then leaves right before the events it heads.
        if not self._started:
            self._started = True
            await send({"type": "http.response.start", "status": 200, "headers": self._headers})
        await send({"type": "http.response.body", "body": body, "more_body": more_body})

    @staticmethod
    async def _expect_end(call: grpc.aio.UnaryStreamCall) -> None:
        # Only a cancellation or a shutdown can end the call otherwise, and the client has its answer.
        try:
            extra = await call.read()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                logger.warning("the call ended with %s after its last chunk", error.code())
            return
        if extra is not grpc.aio.EOF:
            logger.warning("the service streamed a chunk after the last one; dropped")
