"""A request body read under the size limit and made into the bytes of a ChatCompletionRequest (or
of a CompletionRequest, for a text completion).

The limit is checked against ``Content-Length`` before a byte is read, and again while a chunked
body arrives, so a body over it is never buffered: the answer is a 413 ``request_too_large`` and the
connection closes (the server will not read the rest).

A body within the limit is parsed, translated (translate.py, translate_completions.py) and
serialized for the gRPC call. A
small one is done on the event loop, where sending it elsewhere would cost more than the work. A
large one goes to worker processes at the lowest CPU priority: parsing a megabyte of JSON holds the
interpreter's lock for milliseconds in one C call, which a worker thread would not give back to the
event loop, and the work only takes CPU that other requests leave idle. So clients that send the
largest bodies slow each other down, not everyone else (benchmarks/isolation.py measures it).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from starlette.requests import Request

from adapters.rest.errors import APIError, invalid_request
from adapters.rest.routing import conversation_affinity, prompt_affinity
from adapters.rest.translate import chat_request_from_json, parse_body
from adapters.rest.translate_completions import completion_request_from_json
from chatrpc.v1.wire import requested_choices

# Bodies up to this size are translated on the event loop: a typical request is far smaller, and the
# round trip to a worker process is the larger cost for it.
_INLINE_BYTES = 16 * 1024
_LOWEST_PRIORITY = 19


@dataclass(frozen=True)
class TranslatedRequest:
    """A chat or text completion request as the routes use it: its proto's bytes for the call, and
    what shapes the answer."""

    wire: bytes
    stream: bool
    include_usage: bool
    choices: int
    affinity: str  # the replica-picking hash of the chat's (or the prompt's) beginning (routing.py)


def translate_chat_body(body: bytes) -> TranslatedRequest:
    """The body of a ``POST /v1/chat/completions``; raises a 400 ``APIError`` when it is not one."""
    message = chat_request_from_json(parse_body(body))
    return TranslatedRequest(
        message.SerializeToString(),
        message.stream,
        message.stream_options.include_usage,
        requested_choices(message),
        conversation_affinity(message),
    )


def translate_completion_body(body: bytes) -> TranslatedRequest:
    """The body of a ``POST /v1/completions``; raises a 400 ``APIError`` when it is not one."""
    message = completion_request_from_json(parse_body(body))
    return TranslatedRequest(
        message.SerializeToString(),
        message.stream,
        message.stream_options.include_usage,
        requested_choices(message),
        prompt_affinity(message),
    )


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than this server accepts ({limit} bytes).",
        code="request_too_large",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body; 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise invalid_request("The Content-Length header is not a number.")
        if int(declared) > limit:
            raise too_large(limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _start_worker(parent: int) -> None:
    os.setpriority(os.PRIO_PROCESS, 0, _LOWEST_PRIORITY)
    # A worker would outlive an adapter that was killed: every worker holds both ends of the pool's
    # queue, so none ever reads its end. It leaves when its parent is gone.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


class BodyReader:
    """Reads requests' bodies; owns the worker processes for the large ones."""

    def __init__(self, max_request_bytes: int, workers: int = 2) -> None:
        self.max_request_bytes = max_request_bytes
        self._workers = workers
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # Spawned, not forked: the adapter's process runs an event loop and gRPC's threads, which a
        # fork would copy in whatever state they are.
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(
            self._workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),)
        )

    async def start(self) -> None:
        """Starts the workers now rather than on the first large body."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._pool, os.getpid) for _ in range(self._workers)))

    async def chat_request(self, request: Request) -> TranslatedRequest:
        return await self._translated(request, translate_chat_body)

    async def completion_request(self, request: Request) -> TranslatedRequest:
        return await self._translated(request, translate_completion_body)

    async def _translated(self, request: Request, translate: Callable[[bytes], TranslatedRequest]) -> TranslatedRequest:
        """The body read and made into a request by ``translate`` (a module-level function: a worker
        process gets it pickled by name)."""
        body = await read_body(request, self.max_request_bytes)
        if len(body) <= _INLINE_BYTES:
            return translate(body)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, translate, body)
        except BrokenProcessPool:
            # A worker died (killed from outside, out of memory): the pool is unusable from then on.
            # A new one takes this request and the ones after it.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return await loop.run_in_executor(self._pool, translate, body)

    def close(self) -> None:
        # Waits for the workers to exit: idle ones do so at once, and the adapter's process may end
        # right after this (uvicorn ends it by the signal it got).
        self._pool.shutdown(wait=True, cancel_futures=True)
