"""A call that ends early frees its sequence slot at once: a gRPC cancel, a passed deadline, an HTTP
client that hangs up on the REST adapter.

The server has one slot, so a second request, sent once the first is running, is admitted only
when the first has let it go. The first asks for close to the whole context with its end tokens
banned: had it kept its slot, the second would wait for all of that. The second must finish within
a quarter of the time the first's remaining tokens would have taken, at the first's own pace
(speculation off, so a decode step is one token and one chunk): the slot was freed at the next step
or near it, not when the first would have ended. (tests/adapters/test_streaming_http.py checks
disconnects with every slot busy.)
"""

from __future__ import annotations

import time
from concurrent.futures import Future

import grpc
import httpx
import pytest

from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from tests.conftest import start_server, stop_server

MODEL = "gemma-3-270m"
NEVER_END = {1: -100.0, 106: -100.0, 212: -100.0}  # Gemma's end-of-generation tokens
PROMPT = "Count to a thousand."
CTX_SIZE = 4096
LONG = CTX_SIZE - 100  # the first request's max_tokens: nearly the whole context, past its prompt
TIMED_CHUNKS = 12  # chunks of the first request that time its pace, when the test ends it
DEADLINE = 10.0  # seconds: several chunks come before it on a slow machine, the end long after on a fast one


@pytest.fixture(scope="module")
def one_slot_server(tmp_path_factory: pytest.TempPathFactory):
    running = start_server(
        tmp_path_factory.mktemp("one-slot"),
        extra_args=("--parallel", "1", "--ctx-size", str(CTX_SIZE), "--speculative-tokens", "0"),
    )
    yield running
    stop_server(running)


class FirstRequest:
    """The slot holder's chunk arrival times, and from them its pace."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []

    def chunk(self) -> None:
        self.arrivals.append(time.monotonic())

    def time_left(self) -> float:
        """Seconds its remaining tokens would still take at its pace so far (one chunk per step)."""
        assert len(self.arrivals) >= 3, f"too few chunks to time: {len(self.arrivals)}"
        step = (self.arrivals[-1] - self.arrivals[0]) / (len(self.arrivals) - 1)
        return (LONG - len(self.arrivals)) * step


def long_request() -> chat_pb2.ChatCompletionRequest:
    return chat_pb2.ChatCompletionRequest(
        model=MODEL,
        messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text=PROMPT)],
        max_tokens=LONG,
        logit_bias=NEVER_END,
    )


def second_request(stub, metadata) -> Future:
    """A one-token request, sent now; with one slot it waits until the first lets go of it."""
    request = chat_pb2.ChatCompletionRequest(
        model=MODEL, messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text="Hi")], max_tokens=1
    )
    return stub.CreateChatCompletion.future(request, metadata=metadata, timeout=600)


def end_by_grpc_cancel(server, stub, metadata, first: FirstRequest) -> Future:
    call = stub.StreamChatCompletion(long_request(), metadata=metadata, timeout=600)
    second = None
    for _ in range(TIMED_CHUNKS):
        next(call)
        first.chunk()
        second = second or second_request(stub, metadata)
    call.cancel()
    return second


def end_by_deadline(server, stub, metadata, first: FirstRequest) -> Future:
    call = stub.StreamChatCompletion(long_request(), metadata=metadata, timeout=DEADLINE)
    second = None
    with pytest.raises(grpc.RpcError) as error:
        for _ in call:
            first.chunk()
            second = second or second_request(stub, metadata)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert second is not None, "no chunk came before the deadline"
    return second


def end_by_http_disconnect(server, stub, metadata, first: FirstRequest) -> Future:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": LONG,
        "logit_bias": {str(token): bias for token, bias in NEVER_END.items()},
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with (
        httpx.Client(base_url=server.rest_base_url, headers=headers, timeout=600) as http,
        http.stream("POST", "/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = (line for line in response.iter_lines() if line)
        second = None
        for _ in range(TIMED_CHUNKS):
            assert next(lines).startswith("data: {")
            first.chunk()
            second = second or second_request(stub, metadata)
    # Leaving the block closed the response and the connection: the client has gone.
    return second


@pytest.mark.parametrize("end", [end_by_grpc_cancel, end_by_deadline, end_by_http_disconnect])
def test_a_call_that_ends_early_frees_its_slot(one_slot_server, end):
    metadata = (("authorization", f"Bearer {one_slot_server.api_key}"),)
    with grpc.insecure_channel(one_slot_server.grpc_target) as channel:
        stub = chat_pb2_grpc.ChatCompletionsStub(channel)
        first = FirstRequest()
        second = end(one_slot_server, stub, metadata, first)
        bound = first.time_left() / 4
        try:
            answer = second.result(timeout=bound)
        except grpc.FutureTimeoutError:
            pytest.fail(f"the next request waited over {bound:.1f} s: the slot was not freed when the call ended")
    assert answer.usage.completion_tokens == 1
