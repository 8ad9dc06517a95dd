"""Streaming over raw HTTP (httpx, no SDK) against the real server: the SSE wire format, clients that
leave mid-stream, and concurrent streams under continuous batching.
"""

from __future__ import annotations

import json
import math
import time

import httpx
import pytest

from chatrpc.cli import build_parser
from tests.adapters.at_once import at_once
from tests.conftest import PARALLEL

MODEL = "gemma-3-270m"
NO_END = {"1": -100, "106": -100}  # Gemma's <eos> and <end_of_turn>: banned, a sequence cannot end early
PROMPTS = [
    "What is the capital of France? Answer in one word.",
    "Write a short poem about the sea.",
    "List three colours.",
    "Translate 'good morning' into German.",
]


def body(prompt: str = PROMPTS[0], **fields) -> dict:
    request = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 10}
    request.update(fields)
    return request


@pytest.fixture(scope="module")
def headers(server) -> dict:
    return {"Authorization": f"Bearer {server.api_key}"}


@pytest.fixture(scope="module")
def http(server, headers):
    with httpx.Client(base_url=server.rest_base_url, headers=headers, timeout=120) as client:
        yield client


def parse_events(raw: bytes) -> list[bytes]:
    """The SSE body split into events; each must be exactly one ``data: ...`` line and a blank line."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    events = raw[:-2].split(b"\n\n")
    for event in events:
        assert event.startswith(b"data: "), event
        assert b"\n" not in event and b"\r" not in event, event
    return [event[len(b"data: ") :] for event in events]


def stream_chunks(http: httpx.Client, request: dict) -> list[dict]:
    with http.stream("POST", "/chat/completions", json={**request, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        raw = response.read()
    payloads = parse_events(raw)
    assert payloads[-1] == b"[DONE]"
    return [json.loads(payload) for payload in payloads[:-1]]


def text_of(chunks: list[dict]) -> str:
    return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])


# ---------------------------------------------------------------------------
# Wire format
# ---------------------------------------------------------------------------


def test_sse_wire_format(http):
    request = body(temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True})
    with http.stream("POST", "/chat/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].split(";")[0].strip() == "text/event-stream"
        assert response.headers.get("cache-control") == "no-cache"
        raw = response.read()
    payloads = parse_events(raw)
    assert payloads[-1] == b"[DONE]"
    assert payloads.count(b"[DONE]") == 1
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert len(chunks) >= 3
    ids = {chunk["id"] for chunk in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == MODEL
        assert "usage" in chunk
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [chunk for chunk in chunks if chunk["choices"] and chunk["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert all(chunk["usage"] is None for chunk in chunks[:-1])

    unary = http.post("/chat/completions", json=body(temperature=0, max_tokens=12)).json()
    assert text_of(chunks) == unary["choices"][0]["message"]["content"]


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_of_several_choices_ends_once_all_have_finished(http, include_usage):
    """The adapter ends the stream at the service's last chunk (every choice's finish_reason, then
    the usage chunk when asked for), without waiting for the call's status: nothing is cut off."""
    request = body(
        PROMPTS[1], n=3, temperature=1.0, seed=11, max_tokens=8, stream_options={"include_usage": include_usage}
    )
    chunks = stream_chunks(http, request)
    finished = [choice["index"] for chunk in chunks for choice in chunk["choices"] if choice["finish_reason"]]
    assert sorted(finished) == [0, 1, 2]
    unary = http.post("/chat/completions", json={**request, "stream": False, "stream_options": None}).json()
    for choice in unary["choices"]:
        streamed = "".join(
            c["delta"].get("content") or ""
            for chunk in chunks
            for c in chunk["choices"]
            if c["index"] == choice["index"]
        )
        assert streamed == choice["message"]["content"]
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == unary["usage"]["completion_tokens"]
    else:
        assert chunks[-1]["choices"][0]["finish_reason"] is not None


def test_sse_events_arrive_incrementally(http):
    """Events are flushed as tokens are made, not buffered until the end."""
    request = body(temperature=0, max_tokens=60, logit_bias=NO_END, stream=True)
    arrivals = []
    with http.stream("POST", "/chat/completions", json=request) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
    # One event per decode step: a step emits one token, or up to K + 1 when it checked K guesses
    # (--speculative-tokens, left at its default here), so 60 tokens make at least 60 / (K + 1)
    # content events. How many guesses a step checks follows the step times measured on the machine,
    # so the count between that bound and 60 varies from run to run; the tokens do not.
    most_per_event = build_parser().parse_args(["serve"]).speculative_tokens + 1
    assert len(arrivals) >= math.ceil(60 / most_per_event)
    # 60 tokens take at least ~0.5 s: the first event must come well before the last.
    assert arrivals[-1] - arrivals[0] > 0.2


def test_stream_without_auth_is_401_json_not_sse(server):
    response = httpx.post(f"{server.rest_base_url}/chat/completions", json=body(stream=True), timeout=60)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/json")
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


# ---------------------------------------------------------------------------
# Disconnects free their sequences
# ---------------------------------------------------------------------------


def test_disconnected_streams_free_their_sequences(server, headers, http):
    # Fill every slot with a stream that cannot end early (about 6000 tokens in all), read a
    # few events from each so that all four are running, then hang up on all of them.
    long_request = body(PROMPTS[1], temperature=1.0, max_tokens=1500, logit_bias=NO_END, stream=True)
    clients = [httpx.Client(base_url=server.rest_base_url, headers=headers, timeout=60) for _ in range(PARALLEL)]
    streams = []
    try:
        for client in clients:
            response = client.send(client.build_request("POST", "/chat/completions", json=long_request), stream=True)
            assert response.status_code == 200
            streams.append((response, response.iter_lines()))
        for _ in range(3):
            for _response, lines in streams:
                line = next(lines)
                while not line:
                    line = next(lines)
                assert line.startswith("data: {")
    finally:
        for response, _ in streams:
            response.close()
        for client in clients:
            client.close()

    # Had the four sequences kept running, this one would wait for thousands of tokens.
    start = time.monotonic()
    response = http.post("/chat/completions", json=body(temperature=0, max_tokens=10), timeout=30)
    elapsed = time.monotonic() - start
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert elapsed < 30

    # And all four slots are free again: four requests at once all complete promptly.
    responses = at_once(
        [
            lambda prompt=prompt: http.post(
                "/chat/completions", json=body(prompt, temperature=0, max_tokens=8), timeout=30
            )
            for prompt in PROMPTS
        ]
    )
    assert all(response.status_code == 200 for response in responses), [r.text for r in responses]


def test_disconnected_non_streaming_request_frees_its_sequence(server, headers, http):
    """A unary request whose client times out is cancelled too."""
    long_request = body(PROMPTS[1], temperature=1.0, max_tokens=1500, logit_bias=NO_END)
    for _ in range(PARALLEL):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.rest_base_url}/chat/completions", json=long_request, headers=headers, timeout=0.5)
    start = time.monotonic()
    response = http.post("/chat/completions", json=body(temperature=0, max_tokens=10), timeout=30)
    assert response.status_code == 200, response.text
    assert time.monotonic() - start < 30


# ---------------------------------------------------------------------------
# Concurrent streams under continuous batching
# ---------------------------------------------------------------------------


def run_concurrently(http: httpx.Client, requests: list[dict]) -> list[str]:
    """The streamed text of each request, all started at the same moment from their own threads."""
    return at_once([lambda request=request: text_of(stream_chunks(http, request)) for request in requests], timeout=120)


def test_concurrent_streams_match_solo_runs(http):
    requests = [body(prompt, temperature=0, max_tokens=30, logit_bias=NO_END) for prompt in PROMPTS]
    alone = [text_of(stream_chunks(http, request)) for request in requests]
    # Two rounds: which slot each request gets, and so how the batch is laid out, varies.
    for round_ in range(2):
        together = run_concurrently(http, requests)
        for index, text in enumerate(alone):
            assert together[index] == text, (round_, index, together[index], text)


def test_identical_concurrent_requests_give_identical_text(http):
    """Four copies of one temperature-0 request, decoded in the same batches, must agree."""
    request = body(PROMPTS[1], temperature=0, max_tokens=20, logit_bias=NO_END)
    alone = text_of(stream_chunks(http, request))
    together = run_concurrently(http, [request] * PARALLEL)
    assert together == [alone] * PARALLEL


async def test_concurrent_async_streams_with_different_lengths(server, headers):
    """Sequences of different lengths join and leave the batch without disturbing each other."""
    import asyncio

    lengths = [5, 15, 25, 35]
    requests = [
        body(prompt, temperature=0, max_tokens=length, logit_bias=NO_END, stream=True)
        for prompt, length in zip(PROMPTS, lengths, strict=True)
    ]

    async def run(client: httpx.AsyncClient, request: dict) -> tuple[str, str | None]:
        async with client.stream("POST", "/chat/completions", json=request) as response:
            assert response.status_code == 200
            raw = await response.aread()
        chunks = [json.loads(payload) for payload in parse_events(raw)[:-1]]
        reasons = [
            c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]
        ]
        return text_of(chunks), reasons[-1] if reasons else None

    async with httpx.AsyncClient(base_url=server.rest_base_url, headers=headers, timeout=120) as client:
        alone = [await run(client, request) for request in requests]
        together = await asyncio.gather(*(run(client, request) for request in requests))
    assert list(together) == alone
    assert all(reason == "length" for _, reason in together)
