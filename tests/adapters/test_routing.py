"""The adapter in front of several replicas (adapters/rest/routing.py): gRPC's own balancing.

Two `chatrpc grpc` replicas on loopback and `chatrpc rest --upstream ipv4:...` in front of them.
Which replica served a request is read from the replicas' access lines, by its request id. With
`--routing prefix` every turn of a chat reaches one replica, and an `X-Session-Id` overrides the
conversation's hash; with `round-robin` the calls take the replicas in turn; a replica that drains
(SIGTERM) leaves the rotation and the chat's next turn is served by the other.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid

import httpx

from adapters.rest.routing import conversation_affinity, session_affinity
from chatrpc.local_server import GRPC_HEALTH_SCHEME, LOOPBACK, LocalServer, free_port, grpc_command, rest_command
from chatrpc.v1 import chat_pb2
from tests.conftest import CTX_SIZE, MODEL_ID, REPO

LOG_WITHIN = 10.0  # seconds for a call's access line to reach its replica's log


# ---- the affinity key --------------------------------------------------------------------------


def proto_chat(*turns: tuple[int, str], model: str = MODEL_ID) -> chat_pb2.ChatCompletionRequest:
    return chat_pb2.ChatCompletionRequest(
        model=model, messages=[chat_pb2.ChatMessage(role=role, text=text) for role, text in turns]
    )


SYSTEM = (chat_pb2.ROLE_SYSTEM, "You are terse.")
QUESTION = (chat_pb2.ROLE_USER, "Name a colour.")


def test_every_turn_of_a_chat_has_the_affinity_of_its_beginning():
    first = proto_chat(SYSTEM, QUESTION)
    third = proto_chat(
        SYSTEM, QUESTION, (chat_pb2.ROLE_ASSISTANT, "Blue."), (chat_pb2.ROLE_USER, "Another."),
        (chat_pb2.ROLE_ASSISTANT, "Red."), (chat_pb2.ROLE_USER, "One more."),
    )  # fmt: skip
    assert conversation_affinity(first) == conversation_affinity(third)
    assert conversation_affinity(first) != conversation_affinity(
        proto_chat((chat_pb2.ROLE_SYSTEM, "Be kind."), QUESTION)
    )
    assert conversation_affinity(first) != conversation_affinity(proto_chat(SYSTEM, (chat_pb2.ROLE_USER, "Hi")))
    assert conversation_affinity(first) != conversation_affinity(proto_chat(SYSTEM, QUESTION, model="other"))


def test_a_session_id_is_used_only_when_it_can_be_metadata():
    assert session_affinity("chat-42") == "chat-42"
    assert session_affinity(None) is None
    assert session_affinity("") is None
    assert session_affinity("é") is None
    assert session_affinity("x" * 129) is None


# ---- two replicas behind one adapter -----------------------------------------------------------


def open_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "CHATRPC_API_KEYS"}


class Replicas:
    """Replicas and an adapter in front of them, started and stopped together."""

    def __init__(self, tmp_path, count: int, routing: str) -> None:
        self.replicas: list[LocalServer] = []
        ports = [free_port() for _ in range(count)]
        for port in ports:
            command = grpc_command(port, "--parallel", "2", "--ctx-size", str(CTX_SIZE), "--log-level", "info")
            self.replicas.append(
                LocalServer(f"replica-{port}", command, GRPC_HEALTH_SCHEME + f"{LOOPBACK}:{port}",
                            tmp_path / f"replica-{port}.log", env=open_env(), cwd=REPO)
            )  # fmt: skip
        self.rest_port = free_port()
        target = "ipv4:" + ",".join(f"{LOOPBACK}:{port}" for port in ports)
        self.adapter = LocalServer(
            "adapter", rest_command(self.rest_port, ports[0], "--upstream", target, "--routing", routing),
            f"http://{LOOPBACK}:{self.rest_port}/health/ready", tmp_path / "adapter.log", env=open_env(), cwd=REPO,
        )  # fmt: skip

    def __enter__(self) -> Replicas:
        try:
            for replica in self.replicas:
                replica.wait_ready()
            self.adapter.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_) -> None:
        for server in (self.adapter, *self.replicas):
            server.stop()

    def chat(self, messages: list[dict], **headers: str) -> tuple[str, str]:
        """Sends one turn; its answer's text and the index of the replica that served it."""
        request_id = f"route-{uuid.uuid4().hex}"
        answer = httpx.post(
            f"http://{LOOPBACK}:{self.rest_port}/v1/chat/completions",
            json={"model": MODEL_ID, "messages": messages, "max_tokens": 3, "temperature": 0},
            headers={"x-request-id": request_id, **headers},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["message"]["content"], self.served_by(request_id)

    def served_by(self, request_id: str) -> int:
        deadline = time.monotonic() + LOG_WITHIN
        while time.monotonic() < deadline:
            for index, replica in enumerate(self.replicas):
                if f" {request_id} " in replica.log():  # its access line (text) names it
                    return index
            time.sleep(0.1)
        raise AssertionError(f"no replica logged {request_id}")


def converse(replicas: Replicas, opening: str, turns: int, **headers: str) -> list[int]:
    """A chat of `turns` turns, each resending the history; the replica of each turn."""
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": opening}]
    served = []
    for turn in range(turns):
        text, replica = replicas.chat(messages, **headers)
        served.append(replica)
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"And {turn}?"}]
    return served


def test_prefix_routing_keeps_each_chat_on_one_replica_and_fails_over_when_it_drains(tmp_path):
    with Replicas(tmp_path, 2, "prefix") as replicas:
        chats = [converse(replicas, f"Name fruit number {index}.", 3) for index in range(4)]
        for served in chats:
            assert len(set(served)) == 1, chats
        # Two chats with one session id share a replica, whatever they say.
        one = converse(replicas, "Name a tree.", 1, **{"x-session-id": "session-7"})
        other = converse(replicas, "Name a river.", 1, **{"x-session-id": "session-7"})
        assert one == other

        # The replica of the first chat drains: it leaves the rotation, and the chat goes on.
        home = chats[0][0]
        replicas.replicas[home].process.terminate()
        replicas.replicas[home].process.wait(timeout=30)
        moved = converse(replicas, "Name fruit number 0.", 2)
        assert set(moved) == {1 - home}


def test_round_robin_takes_the_replicas_in_turn(tmp_path):
    with Replicas(tmp_path, 2, "round-robin") as replicas:
        served = converse(replicas, "Name a bird.", 4)
    assert sorted(served) == [0, 0, 1, 1], served
    assert all(a != b for a, b in itertools.pairwise(served)), served
