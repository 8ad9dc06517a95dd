"""Fair admission across API keys and --max-inflight-per-key, on a server of their own.

One sequence slot (`--parallel 1`), so that requests run one at a time and the order they finish
in is the order admission took them. Nothing here waits on a clock: the queue's state is read from
the server's own refusals.
"""

from __future__ import annotations

import threading
import time

import grpc
import httpx
import pytest

from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from tests.conftest import start_server, stop_server

NEVER_END = {1: -100.0, 106: -100.0, 212: -100.0}  # Gemma's end-of-generation tokens
KEY_A, KEY_B = "fair-key-a", "fair-key-b"
FLOOD = 30  # key A's requests waiting behind the one that holds the slot
INFLIGHT = FLOOD + 1  # --max-inflight-per-key: the holder and the flood
EXTRA = 10  # key A's requests beyond its limit, each refused
DEADLINE = 120  # seconds: every call and every wait here ends by itself


def _request(text: str, **fields) -> chat_pb2.ChatCompletionRequest:
    return chat_pb2.ChatCompletionRequest(
        model="gemma-3-270m", messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text=text)], **fields
    )


def _metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _wait_until_done(calls: list, count: int) -> list:
    """Until `count` of the calls have ended (within DEADLINE); returns those."""
    deadline = time.monotonic() + DEADLINE
    while len(done := [c for c in calls if c.done()]) < count:
        assert time.monotonic() < deadline, f"only {len(done)} of {count} calls ended"
        time.sleep(0.05)
    return done


def _holding_stream(stub, key: str):
    """A stream that never ends by itself: it holds its slot, or its place in the queue, until cancelled."""
    return stub.StreamChatCompletion(
        _request("Count to a thousand.", max_tokens=1500, logit_bias=NEVER_END),
        metadata=_metadata(key),
        timeout=DEADLINE,
    )


@pytest.fixture(scope="module")
def two_key_server(tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("fair"),
        env_keys=f"{KEY_A},{KEY_B}",
        # --max-waiting: key A's flood and one request of key B, so that B's queued request can be seen.
        extra_args=("--parallel", "1", "--max-waiting", str(FLOOD + 1), "--max-inflight-per-key", str(INFLIGHT)),
    )
    yield server
    stop_server(server)


def test_a_key_flooding_the_queue_does_not_hold_back_another_keys_request(two_key_server):
    with grpc.insecure_channel(two_key_server.grpc_target) as channel:
        stub = chat_pb2_grpc.ChatCompletionsStub(channel)
        holder = _holding_stream(stub, KEY_A)
        next(holder)  # admitted: it holds the only slot, so nothing else is admitted until it ends
        finished: list[str] = []
        lock = threading.Lock()

        def call(key: str, name: str):
            future = stub.CreateChatCompletion.future(
                _request(f"Say something about the number {name}.", max_tokens=3),
                metadata=_metadata(key),
                timeout=DEADLINE,
            )

            def record(done):
                if done.exception() is None:
                    with lock:
                        finished.append(name)

            future.add_done_callback(record)
            return future

        try:
            flood = [call(KEY_A, f"a{i}") for i in range(FLOOD + EXTRA)]
            # The holder and FLOOD of these reach key A's limit and the other EXTRA are refused; once
            # they have been, the FLOOD accepted ones are all waiting.
            refused = _wait_until_done(flood, EXTRA)
            assert len(refused) == EXTRA
            for future in refused:
                assert future.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "this API key" in future.details() and KEY_A not in future.details()
            # The queue has room for one more request: of key B's two, one waits and the other is
            # refused as the queue is full (whichever arrives second), so once one is refused the
            # other is waiting. Key A's limit is not key B's.
            b_calls = [call(KEY_B, "b0"), call(KEY_B, "b1")]
            (b_refused,) = _wait_until_done(b_calls, 1)
            assert b_refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "requests are waiting" in b_refused.details()
            b_waiting = "b1" if b_refused is b_calls[0] else "b0"
        finally:
            holder.cancel()

        for future in flood + b_calls:
            if future not in refused and future is not b_refused:
                future.result(timeout=DEADLINE)
        assert len(finished) == FLOOD + 1
        # Admission takes the keys in turn: one request of A (A joined the turn first), then B's;
        # first in, first out would answer B's last, behind all of A's queue. (Answers arrive on
        # grpc's threads, so their order may differ by one from the server's.)
        assert finished.index(b_waiting) <= 2, finished


def test_the_limit_per_key_is_a_429_through_rest_until_the_requests_end(two_key_server):
    body = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    url = f"{two_key_server.rest_base_url}/chat/completions"
    headers = {"Authorization": f"Bearer {KEY_A}"}
    with grpc.insecure_channel(two_key_server.grpc_target) as channel, httpx.Client(timeout=DEADLINE) as client:
        stub = chat_pb2_grpc.ChatCompletionsStub(channel)
        holders = [_holding_stream(stub, KEY_A) for _ in range(INFLIGHT + EXTRA)]
        try:
            refused = _wait_until_done(holders, EXTRA)  # then the other INFLIGHT are all counted
            assert all(stream.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for stream in refused)
            answer = client.post(url, json=body, headers=headers)
            assert answer.status_code == 429, answer.text
            error = answer.json()["error"]
            assert "this API key" in error["message"] and KEY_A not in error["message"]
            assert error["code"] == "rate_limit_exceeded"
        finally:
            for stream in holders:
                stream.cancel()
        # Cancelled, they stop counting as the server hears of it (the waiting ones leave the queue
        # at once): key A is served again.
        deadline = time.monotonic() + DEADLINE
        while (answer := client.post(url, json=body, headers=headers)).status_code == 429:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.1)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] >= 1


def test_a_key_is_kept_from_the_last_free_slot_which_another_keys_request_takes_at_once(tmp_path_factory):
    # Two keys and two slots: by default (--max-slots-per-key) one key's requests hold at most one.
    server = start_server(tmp_path_factory.mktemp("slots"), env_keys=f"{KEY_A},{KEY_B}", extra_args=("--parallel", "2"))
    try:
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = chat_pb2_grpc.ChatCompletionsStub(channel)
            first, second = _holding_stream(stub, KEY_A), _holding_stream(stub, KEY_A)
            try:
                next(first)
                # Were A's second stream admitted, both slots would be held until cancelled and B's
                # request would run out of time; it is answered while both of A's streams go on.
                answer = stub.CreateChatCompletion(
                    _request("Say hi.", max_tokens=3), metadata=_metadata(KEY_B), timeout=DEADLINE
                )
                assert answer.usage.completion_tokens >= 1
                assert not second.done()
                first.cancel()
                next(second)  # A's first slot is free again: its second stream takes it
            finally:
                first.cancel()
                second.cancel()
    finally:
        stop_server(server)
