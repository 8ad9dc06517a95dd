"""Same request, same answer, whatever came before or runs beside it (issue 21).

One fixed sequence of requests (greedy, seeded, n with a seed, a json_schema and a named tool at
temperature 0, a long system prompt and the chat's next turn, a streamed answer, a text completion)
goes to two servers started separately with the default flags: one quiet, where every request
decodes alone (and so checks prompt-lookup guesses), and one that first answers other requests
(some sharing the long system prompt, so its prefix cache holds other prompts and answers) and
then keeps unrelated requests running beside the sequence. Every choice must be byte-identical,
logprobs included; tool call ids are random by design and set aside.
"""

from __future__ import annotations

import copy
import json
import threading
import time

import httpx
import pytest

from tests.conftest import start_server, stop_server

MODEL = "gemma-3-270m"
FLAGS = ("--parallel", "6")
NOTES = "The harbour master logs every boat: its name, its crew, the hour it left and the catch it brought back. " * 9
SYSTEM = "You are the archivist of a small fishing town. Answer from these notes only.\n" + NOTES
TURN_ONE = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does the harbour master log?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"days": {"type": "integer"}, "city": {"type": "string"}},
            "required": ["days", "city"],
            "additionalProperties": False,
        },
    },
}
SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "year": {"type": "integer"}, "good": {"type": "boolean"}},
    "required": ["title", "year", "good"],
    "additionalProperties": False,
}


def chat(content: str, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


SEQUENCE: list[tuple[str, dict]] = [
    ("/chat/completions", chat("Write two sentences about lighthouses.", temperature=0, max_tokens=40, logprobs=True)),
    (
        "/chat/completions",
        chat("Name a colour and say why.", temperature=0.9, top_p=0.95, seed=7, max_tokens=40, logprobs=True),
    ),
    ("/chat/completions", chat("Invent a name for a boat.", temperature=1.0, seed=11, n=3, max_tokens=16)),
    (
        "/chat/completions",
        chat(
            "Describe a film you like.",
            temperature=0,
            max_tokens=60,
            response_format={"type": "json_schema", "json_schema": {"name": "film", "schema": SCHEMA}},
        ),
    ),
    (
        "/chat/completions",
        chat(
            "What will the weather be in Lisbon for the next three days?",
            temperature=0,
            max_tokens=40,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "weather"}},
        ),
    ),
    ("/chat/completions", {"model": MODEL, "messages": TURN_ONE, "temperature": 0, "max_tokens": 40, "logprobs": True}),
    # The next turn repeats the first turn's answer: filled in from the first turn's response.
    ("/chat/completions", {"model": MODEL, "messages": [], "temperature": 0, "max_tokens": 40, "logprobs": True}),
    (
        "/chat/completions",
        chat("Count from one to ten in French.", temperature=0, max_tokens=40, stream=True, logprobs=True),
    ),
    (
        "/completions",
        {"model": MODEL, "prompt": "The oldest boat in the harbour", "temperature": 0.7, "seed": 3, "max_tokens": 30,
         "logprobs": 2},
    ),
]  # fmt: skip

UNRELATED = [
    chat("Tell me a long story about a dragon and a baker.", temperature=0.8, max_tokens=120),
    {"model": MODEL, "messages": [TURN_ONE[0], {"role": "user", "content": "Who logs the catch?"}], "max_tokens": 30},
    chat("List ten fruits, one per line.", temperature=0, max_tokens=60),
    chat("Explain tides to a child.", temperature=1.2, top_p=0.9, max_tokens=90, n=2),
    {"model": MODEL, "messages": [*TURN_ONE, {"role": "assistant", "content": "Boats."}], "max_tokens": 20},
]


def post(client: httpx.Client, path: str, body: dict) -> dict:
    if not body.get("stream"):
        response = client.post(path, json=body)
        assert response.status_code == 200, response.text
        return response.json()
    content, logprobs, finish = [], [], None
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[len("data: ") :])["choices"]:
                content.append(choice["delta"].get("content") or "")
                logprobs += (choice.get("logprobs") or {}).get("content") or []
                finish = choice.get("finish_reason") or finish
    return {"choices": [{"content": "".join(content), "logprobs": logprobs, "finish_reason": finish}]}


def choices(response: dict) -> list[dict]:
    """The response's choices, without what is random by design (tool call ids)."""
    kept = copy.deepcopy(response["choices"])
    for choice in kept:
        for call in (choice.get("message") or {}).get("tool_calls") or []:
            call.pop("id", None)
    return kept


def run_sequence(client: httpx.Client) -> list[list[dict]]:
    answers = []
    first_turn = None
    for path, body in SEQUENCE:
        if path == "/chat/completions" and not body["messages"]:
            answer = first_turn["choices"][0]["message"]["content"]
            body = {**body, "messages": [*TURN_ONE, {"role": "assistant", "content": answer},
                                         {"role": "user", "content": "And who reads the log?"}]}  # fmt: skip
        response = post(client, path, body)
        if body.get("messages") == TURN_ONE:
            first_turn = response
        answers.append(choices(response))
    return answers


def client_for(server) -> httpx.Client:
    return httpx.Client(
        base_url=server.rest_base_url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=300
    )


class Traffic:
    """Unrelated requests from `streams` threads until stopped, at most `limit` each: the load a
    replica in a mesh has beside any one caller's request."""

    def __init__(self, server, streams: int = 3, limit: int = 30) -> None:
        self._stop = threading.Event()
        self.sent = 0
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._run, args=(server, i, limit)) for i in range(streams)]

    def _run(self, server, index: int, limit: int) -> None:
        with client_for(server) as client:
            for count in range(limit):
                if self._stop.is_set():
                    return
                body = UNRELATED[(index + count) % len(UNRELATED)]
                response = client.post("/chat/completions", json=body)
                self.sent += 1
                if response.status_code != 200:
                    self.errors.append(response.text)

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        time.sleep(2)  # the first unrelated requests are decoding when the sequence starts
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=600)


@pytest.fixture(scope="module")
def quiet_answers(tmp_path_factory: pytest.TempPathFactory) -> list[list[dict]]:
    server = start_server(tmp_path_factory.mktemp("quiet"), extra_args=FLAGS)
    try:
        with client_for(server) as client:
            return run_sequence(client)
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def busy_answers(tmp_path_factory: pytest.TempPathFactory) -> list[list[dict]]:
    server = start_server(tmp_path_factory.mktemp("busy"), extra_args=FLAGS)
    try:
        with client_for(server) as client:
            for body in UNRELATED[:2] + UNRELATED[4:]:  # earlier requests: other prefixes cached
                assert client.post("/chat/completions", json=body).status_code == 200
            with Traffic(server) as traffic:
                answers = run_sequence(client)
        assert not traffic.errors, traffic.errors[:3]
        assert traffic.sent >= 3, "the unrelated traffic did not run beside the sequence"
        return answers
    finally:
        stop_server(server)


@pytest.mark.parametrize("index", range(len(SEQUENCE)), ids=[f"{i}:{p}" for i, (p, _) in enumerate(SEQUENCE)])
def test_a_request_answers_the_same_on_a_quiet_and_a_busy_server(quiet_answers, busy_answers, index: int) -> None:
    assert busy_answers[index] == quiet_answers[index]
