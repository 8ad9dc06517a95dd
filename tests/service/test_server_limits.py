"""Server start-up rules and the request queue's limit, on their own servers."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest

from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from tests.conftest import REPO, start_server, stop_server

NEVER_END = {1: -100.0, 106: -100.0, 212: -100.0}  # Gemma's end-of-generation tokens


@pytest.mark.parametrize(
    "command", [["grpc", "--host", "0.0.0.0"], ["serve", "--host", "0.0.0.0"], ["serve", "--grpc-host", "::"]]
)
def test_open_server_refuses_a_non_loopback_address(command):
    env = {k: v for k, v in __import__("os").environ.items() if k != "CHATRPC_API_KEYS"}
    result = subprocess.run(
        [sys.executable, "-m", "chatrpc", *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "refusing to listen" in result.stderr and "--insecure" in result.stderr


def test_full_queue_is_resource_exhausted_and_server_recovers(tmp_path):
    server = start_server(tmp_path, extra_args=("--parallel", "1", "--max-waiting", "1"))
    try:
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = chat_pb2_grpc.ChatCompletionsStub(channel)
            metadata = (("authorization", f"Bearer {server.api_key}"),)
            long_request = chat_pb2.ChatCompletionRequest(
                model="gemma-3-270m",
                messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text="Count to a thousand.")],
                max_tokens=1500,
                logit_bias=NEVER_END,
            )
            running = stub.StreamChatCompletion(long_request, metadata=metadata, timeout=120)
            next(running)  # admitted: it holds the only sequence slot
            next(running)
            waiting = stub.StreamChatCompletion(long_request, metadata=metadata, timeout=120)
            # Its first chunk comes only once it is admitted and prefilled, after `running`: give the
            # server time to receive the call, which its handler queues before awaiting anything.
            time.sleep(1.0)
            with pytest.raises(grpc.RpcError) as error:
                stub.CreateChatCompletion(long_request, metadata=metadata, timeout=30)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            running.cancel()
            waiting.cancel()
            short = chat_pb2.ChatCompletionRequest(
                model="gemma-3-270m", messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text="Hi")], max_tokens=5
            )
            assert stub.CreateChatCompletion(short, metadata=metadata, timeout=60).usage.completion_tokens >= 1
    finally:
        stop_server(server)
