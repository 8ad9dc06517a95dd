"""The gRPC server's connection settings (service/grpc_settings.py) on a real service.

A connection older than --max-connection-age gets GOAWAY: the client's channel leaves READY and its
next call opens a new connection, while a stream that was running on the old one goes on to its end
within --max-connection-age-grace. The mapping of every flag onto gRPC's channel arguments is
checked without a server.
"""

from __future__ import annotations

import threading

import grpc

from chatrpc.local_server import GRPC_HEALTH_SCHEME, LocalServer, free_port, grpc_command
from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from service.grpc_settings import ConnectionSettings
from tests.conftest import MODEL_ID, REPO

NEVER_END = {1: -100.0, 106: -100.0, 212: -100.0}  # Gemma's end-of-generation tokens
AGE = 1.0  # seconds: --max-connection-age, far shorter than the stream below on any machine
STREAM_TOKENS = 200


def test_connection_past_its_age_gets_goaway_and_its_stream_finishes(tmp_path):
    port = free_port()
    command = grpc_command(port, "--max-connection-age", str(AGE), "--max-connection-age-grace", "300")
    target = f"127.0.0.1:{port}"
    service = LocalServer("service", command, GRPC_HEALTH_SCHEME + target, tmp_path / "service.log", cwd=REPO)
    try:
        service.wait_ready()
        states: list[grpc.ChannelConnectivity] = []
        changed = threading.Condition()

        def record(state: grpc.ChannelConnectivity) -> None:
            with changed:
                states.append(state)
                changed.notify_all()

        with grpc.insecure_channel(target) as channel:
            channel.subscribe(record, try_to_connect=True)
            stub = chat_pb2_grpc.ChatCompletionsStub(channel)
            long = chat_pb2.ChatCompletionRequest(
                model=MODEL_ID,
                messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text="Count to a thousand.")],
                max_tokens=STREAM_TOKENS,
                logit_bias=NEVER_END,
                stream_options=chat_pb2.StreamOptions(include_usage=True),
            )
            chunks = list(stub.StreamChatCompletion(long, timeout=300))
            assert chunks[-1].usage.completion_tokens == STREAM_TOKENS  # whole, on the aged connection

            # GOAWAY took the channel out of READY while the stream ran (or at its end).
            def left_ready() -> bool:
                ready = grpc.ChannelConnectivity.READY
                return ready in states and any(state != ready for state in states[states.index(ready) + 1 :])

            with changed:
                assert changed.wait_for(left_ready, 30), states

            # The next call opens a new connection and succeeds.
            short = chat_pb2.ChatCompletionRequest(
                model=MODEL_ID,
                messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text="Hi")],
                max_tokens=2,
            )
            assert stub.CreateChatCompletion(short, timeout=120).usage.completion_tokens >= 1
            channel.unsubscribe(record)
    finally:
        service.stop()


def test_flags_map_onto_grpc_channel_arguments():
    options = dict(
        ConnectionSettings(
            keepalive_time=30,
            keepalive_timeout=5,
            permit_without_calls=False,
            min_client_ping_interval=15,
            max_connection_age=600,
            max_connection_age_grace=120,
            max_concurrent_streams=64,
        ).server_options()
    )
    assert options == {
        "grpc.keepalive_time_ms": 30_000,
        "grpc.keepalive_timeout_ms": 5_000,
        "grpc.keepalive_permit_without_calls": 0,
        "grpc.http2.max_pings_without_data": 0,
        "grpc.http2.min_ping_interval_without_data_ms": 15_000,
        "grpc.max_connection_age_ms": 600_000,
        "grpc.max_connection_age_grace_ms": 120_000,
        "grpc.max_concurrent_streams": 64,
    }
    # 0 leaves gRPC's defaults: connections never age, streams per connection are not capped.
    unset = dict(ConnectionSettings(max_connection_age=0, max_concurrent_streams=0).server_options())
    assert not {"grpc.max_connection_age_ms", "grpc.max_connection_age_grace_ms", "grpc.max_concurrent_streams"} & set(
        unset
    )
