"""Which replica of the gRPC service takes a call: gRPC's own load balancing, set by service config.

The adapter's `--upstream` may name several replicas (`dns:///chatrpc-grpc:50051` for a Kubernetes
headless service, `ipv4:10.0.0.1:50051,10.0.0.2:50051`) or one. Either way the channel:
- checks each replica's health itself (`healthCheckConfig` on the chat service's name), so that a
  replica that drains (it says NOT_SERVING first thing on SIGTERM) or dies leaves the rotation;
- retries a call that failed with UNAVAILABLE, which gRPC does only while no response has arrived,
  so a retried call never duplicates a token;
- picks the replica by one of two policies (`--routing`):
  - `prefix` (the default): `ring_hash` on a hash of the conversation's stable beginning (its
    system messages, tools and first user message; a text completion's: the start of its prompt)
    or of the client's `X-Session-Id`, sent as the AFFINITY_METADATA_KEY metadata; every turn of a
    chat then reaches the replica whose prefix cache holds its history (the service's prefix
    cache, docs/engine.md);
  - `round-robin`: each call to the next healthy replica.
"""

from __future__ import annotations

import hashlib
import json
import os
from enum import Enum

from chatrpc.v1 import chat_pb2
from chatrpc.v1.wire import AFFINITY_METADATA_KEY, MAX_REQUEST_ID_LENGTH

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatCompletions"].full_name
SESSION_HEADER = "x-session-id"
# grpcio takes ring_hash's `requestHashHeader` only with this set (gRFC A76, experimental in 1.85);
# without it every ring-hash call fails with INTERNAL "hash attribute not present".
_REQUEST_HASH_SWITCH = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"
# A call that fails before any response is tried again on another replica, a few times, soon.
_RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
_ROLES_BEFORE_THE_QUESTION = (chat_pb2.ROLE_SYSTEM, chat_pb2.ROLE_DEVELOPER)


class Routing(Enum):
    PREFIX = "prefix"
    ROUND_ROBIN = "round-robin"


def service_config(routing: Routing) -> str:
    """The channel's service config (JSON) for `routing`."""
    if routing is Routing.PREFIX:
        os.environ[_REQUEST_HASH_SWITCH] = "true"  # read when the channel parses this config
        policy = {"ring_hash_experimental": {"requestHashHeader": AFFINITY_METADATA_KEY}}
    else:
        policy = {"round_robin": {}}
    return json.dumps(
        {
            "loadBalancingConfig": [policy],
            "healthCheckConfig": {"serviceName": CHAT_SERVICE},
            "methodConfig": [{"name": [{"service": CHAT_SERVICE}], "retryPolicy": _RETRY_POLICY}],
        }
    )


def conversation_affinity(message: chat_pb2.ChatCompletionRequest) -> str:
    """A hash of what every turn of the chat starts with: the model, the tools, and the messages up
    to the first user message (the system prompt and the opening question)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(message.model.encode())
    for tool in message.tools:
        digest.update(tool.SerializeToString(deterministic=True))
    for turn in message.messages:
        digest.update(turn.SerializeToString(deterministic=True))
        if turn.role not in _ROLES_BEFORE_THE_QUESTION:
            break
    return digest.hexdigest()


# How much of a text completion's prompt its replica-picking hash covers (prompt_affinity).
_AFFINITY_PROMPT_CHARACTERS = 1024
_AFFINITY_PROMPT_TOKENS = 256


def prompt_affinity(message: chat_pb2.CompletionRequest) -> str:
    """A hash of the model and the beginning of a text completion's prompt: its first 1024
    characters, or its first 256 token ids.

    A text prompt does not say which part of it stays the same from one request to the next, as a
    chat's system message and first question do; what a later request can reuse from the prefix
    cache is a beginning it shares with an earlier one (a few-shot preamble, a document asked
    several questions). So only the prompt's start is hashed: prompts that share their first 1024
    characters (some 256 tokens, a prefill worth keeping on one replica) reach the same replica,
    and prompts that part sooner spread over the replicas, what they share being short and cheap
    to prefill again."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(message.model.encode())
    if message.WhichOneof("prompt") == "tokens":
        digest.update(b"tokens")
        digest.update(
            b"".join(token.to_bytes(4, "little", signed=True) for token in message.tokens.ids[:_AFFINITY_PROMPT_TOKENS])
        )
    else:
        digest.update(b"text")
        digest.update(message.text[:_AFFINITY_PROMPT_CHARACTERS].encode())
    return digest.hexdigest()


def session_affinity(session_id: str | None) -> str | None:
    """The client's own session id, when it gave a usable one: it wins over the conversation's hash."""
    if session_id is None or not session_id or len(session_id) > MAX_REQUEST_ID_LENGTH:
        return None
    if not (session_id.isascii() and session_id.isprintable()):
        return None
    return session_id
