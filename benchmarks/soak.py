"""Soak benchmark: every kind of request at once, for a set time, against chatrpc's two processes.

    .venv/bin/python benchmarks/soak.py --minutes 30 --clients 24                # issue 18's goal
    .venv/bin/python benchmarks/soak.py --minutes 2 --clients 8 --warmup 30      # a short check

Starts the gRPC service (`chatrpc grpc --parallel P`) and the REST adapter (`chatrpc rest`) as two
processes on free loopback ports, without API keys, and stops both at the end. `--clients` clients
send requests back to back, each drawing the next kind at random (seeded by `--seed`):

  rest-stream      streaming with the usage chunk, a seed, 16-96 tokens
  rest-n           unary, n of 2 or 3, a seed
  rest-json        unary, response_format json_schema (a bounded object), a seed
  rest-tools       streaming or unary, two tools and tool_choice "required", a seed
  rest-disconnect  streaming with the end tokens banned; the client hangs up after 1-8 events
  grpc-unary       unary over gRPC, n of 1 or 2, a seed
  grpc-deadline    streaming over gRPC with the end tokens banned and a deadline of 0.3-3 s
  grpc-cancel      streaming over gRPC with the end tokens banned, cancelled after 1-8 chunks

Every answer is checked: its status, each SSE event and the closing `[DONE]`, the choices and their
finish_reason, the usage, and, when the model finished on its own, the JSON against its schema and
the tool calls against their parameters (running out of tokens is allowed: docs/engine.md, "JSON
constraints").

Phases: `--warmup` seconds of the same load; once every client has finished the request in hand,
the RSS at start; `--minutes` of load; again once every request has ended, the RSS at end; the idle
probe; SIGTERM to the service, whose shutdown line is read; SIGTERM to the adapter. Nothing starts
after a phase's end, and a request still running `--request-timeout` seconds after its start is
abandoned and counted as an unexpected error, so the run ends by itself.

It reports:
  requests   per kind: how many were sent in the measured phase, how many succeeded
  errors     per kind and outcome. Expected: 429 with Retry-After (the queue is full, as it may be
             under load), cancelled by us (rest-disconnect, grpc-cancel), deadline exceeded
             (grpc-deadline). Everything else is unexpected: another status, an error event in a
             stream, a stream without `[DONE]` or usage, an answer that breaks its constraints, a
             transport error, a request over `--request-timeout`
  latency    p50 and p99, from the send to the last byte, of the requests that succeeded
  RSS        VmRSS of each process (/proc, so Linux only) after the warm-up and after the load, both
             taken with nothing in flight, the growth between them, and samples during the load
  slots held at idle, measured two ways once the load has ended and nothing is in flight:
    probe         `--parallel` streams sent at once over gRPC, each 128 tokens with the end tokens
                  banned. A free slot lets a stream start within a few steps (one prompt chunk per
                  step joins the batch), long before any of them can finish; a stream whose first
                  chunk comes only after another stream has finished waited for a slot that nobody
                  released. Slots held = how many such streams.
    shutdown log  the service runs at --log-level info, and its scheduler logs as it stops the
                  sequences still active, the requests still waiting and the slots in use; the
                  benchmark reads that line from the service's log after SIGTERM.

The goal (issue 18): 30 minutes at 24 clients, 0 unexpected errors, RSS growth of each process at
most 5 %, 0 slots held at idle. The exit status is 1 when the run misses it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import httpx
import jsonschema

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serving import END_TOKENS, MODEL_ID, PROMPTS  # noqa: E402

from chatrpc.local_server import LOOPBACK, LocalServer, free_port, grpc_command, rest_command  # noqa: E402
from chatrpc.v1 import chat_pb2, chat_pb2_grpc  # noqa: E402
from chatrpc.v1.wire import FINISH_REASON_NAMES  # noqa: E402

NO_END_JSON = {str(token): -100 for token in END_TOKENS}
NO_END = {token: -100.0 for token in END_TOKENS}
GOAL_RSS_GROWTH = 0.05
PROBE_TOKENS = 128  # far more decode steps than `--parallel` newcomers need to join the batch
SHUTDOWN_LINE = re.compile(
    r"scheduler (?P<model>\S+) stopping: (?P<active>\d+) sequences active, (?P<waiting>\d+) requests waiting, "
    r"(?P<in_use>\d+) of (?P<slots>\d+) slots in use"
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 24},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a timezone.",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 16}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
TOOL_PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


# --- outcomes ----------------------------------------------------------------------------------


class Failure(Exception):
    """A request that did not succeed; `expected` when the load or the client itself explains it."""

    def __init__(self, outcome: str, *, expected: bool = False, detail: str = "") -> None:
        super().__init__(f"{outcome}: {detail}" if detail else outcome)
        self.outcome, self.expected, self.detail = outcome, expected, detail


CANCELLED_BY_US = Failure("cancelled by us", expected=True)


@dataclass
class Outcome:
    kind: str
    outcome: str  # "ok" or what went wrong
    expected: bool
    seconds: float
    detail: str = ""


def check(condition: bool, what: str, detail: object = "") -> None:
    if not condition:
        raise Failure(f"bad answer: {what}", detail=str(detail)[:300])


def http_failure(response: httpx.Response, body: bytes) -> Failure:
    if response.status_code == 429 and response.headers.get("retry-after"):
        return Failure("429 queue full", expected=True)
    return Failure(f"HTTP {response.status_code}", detail=body[:300].decode(errors="replace"))


def grpc_failure(error: grpc.aio.AioRpcError) -> Failure:
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Failure("RESOURCE_EXHAUSTED queue full", expected=True)
    return Failure(f"gRPC {error.code().name}", detail=error.details() or "")


# --- REST requests -----------------------------------------------------------------------------


def rest_body(rng: random.Random, **fields) -> dict:
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "temperature": rng.choice((0.0, 0.7, 1.0)),
        "seed": rng.randrange(1 << 31),
        "max_tokens": rng.randint(16, 96),
    }
    body.update(fields)
    return body


async def sse_events(response: httpx.Response) -> AsyncIterator[dict | None]:
    """Each event's JSON; None for `[DONE]`. An error event or a malformed line is a Failure."""
    async for line in response.aiter_lines():
        if not line:
            continue
        if not line.startswith("data: "):
            raise Failure("malformed SSE", detail=line[:300])
        payload = line[len("data: ") :]
        if payload == "[DONE]":
            yield None
            continue
        event = json.loads(payload)
        if "error" in event:
            raise Failure("error event", detail=json.dumps(event["error"])[:300])
        yield event


async def rest_stream_chunks(http: httpx.AsyncClient, body: dict) -> list[dict]:
    """The chunks of a whole stream, checked to end with the usage chunk and `[DONE]`."""
    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            raise http_failure(response, await response.aread())
        events = [event async for event in sse_events(response)]
    check(events and events[-1] is None and None not in events[:-1], "the stream does not end with one [DONE]")
    chunks = events[:-1]
    check(len({chunk["id"] for chunk in chunks}) == 1, "chunk ids differ")
    check(chunks and chunks[-1]["choices"] == [] and chunks[-1]["usage"], "no usage chunk last", chunks[-1:])
    return chunks


def check_usage(usage: dict, most: int) -> None:
    check(1 <= usage["completion_tokens"] <= most, "completion_tokens out of range", usage)


async def rest_stream(rng: random.Random, http: httpx.AsyncClient, stub) -> None:
    body = rest_body(rng, stream_options={"include_usage": True})
    chunks = await rest_stream_chunks(http, body)
    finishes = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
    check(finishes in (["stop"], ["length"]), "finish_reason", finishes)
    check_usage(chunks[-1]["usage"], body["max_tokens"])


async def rest_unary(http: httpx.AsyncClient, body: dict) -> dict:
    response = await http.post("/v1/chat/completions", json=body)
    if response.status_code != 200:
        raise http_failure(response, response.content)
    return response.json()


async def rest_n(rng: random.Random, http: httpx.AsyncClient, stub) -> None:
    n = rng.randint(2, 3)
    body = rest_body(rng, n=n, temperature=1.0, max_tokens=rng.randint(16, 48))
    answer = await rest_unary(http, body)
    check([c["index"] for c in answer["choices"]] == list(range(n)), "choice indices", answer["choices"])
    check(all(c["finish_reason"] in ("stop", "length") for c in answer["choices"]), "finish_reason", answer)
    check_usage(answer["usage"], n * body["max_tokens"])


def check_conforms(text: str, schema: dict, failure: str, detail: object) -> None:
    """`text` is JSON that follows `schema`; else the answer fails with `failure`."""
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError) as error:
        raise Failure(failure, detail=detail) from error


async def rest_json(rng: random.Random, http: httpx.AsyncClient, stub) -> None:
    body = rest_body(
        rng,
        messages=[{"role": "user", "content": "Tell me about a person."}],
        temperature=0.7,
        max_tokens=96,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    )
    choice = (await rest_unary(http, body))["choices"][0]
    check(choice["finish_reason"] in ("stop", "length"), "finish_reason", choice)
    if choice["finish_reason"] == "stop":
        content = choice["message"]["content"]
        check_conforms(content, PERSON, "bad answer: JSON breaks its schema", content[:300])


def check_tool_calls(calls: list[dict]) -> None:
    check(bool(calls), "no tool calls")
    for call in calls:
        name = call["function"]["name"]
        check(name in TOOL_PARAMETERS, "unknown function", name)
        arguments = call["function"]["arguments"]
        check_conforms(arguments, TOOL_PARAMETERS[name], "bad answer: arguments break their schema", call["function"])


async def rest_tools(rng: random.Random, http: httpx.AsyncClient, stub) -> None:
    body = rest_body(
        rng,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        temperature=1.0,
        max_tokens=128,
        tools=TOOLS,
        tool_choice="required",
    )
    if rng.random() < 0.5:
        choice = (await rest_unary(http, body))["choices"][0]
        check(choice["finish_reason"] in ("tool_calls", "length"), "finish_reason", choice)
        if choice["finish_reason"] == "tool_calls":
            check_tool_calls(choice["message"]["tool_calls"])
        return
    chunks = await rest_stream_chunks(http, {**body, "stream_options": {"include_usage": True}})
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            for delta in choice["delta"].get("tool_calls") or ():
                call = calls.setdefault(delta["index"], {"function": {"name": "", "arguments": ""}})
                function = delta.get("function") or {}
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""
            if choice["finish_reason"]:
                finishes.append(choice["finish_reason"])
    check(finishes in (["tool_calls"], ["length"]), "finish_reason", finishes)
    if finishes == ["tool_calls"]:
        check_tool_calls([calls[index] for index in sorted(calls)])


async def rest_disconnect(rng: random.Random, http: httpx.AsyncClient, stub) -> None:
    body = rest_body(rng, max_tokens=512, logit_bias=NO_END_JSON, stream=True)
    leave_after = rng.randint(1, 8)
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise http_failure(response, await response.aread())
        seen = 0
        async for event in sse_events(response):
            check(event is not None, "[DONE] before 512 tokens with the end tokens banned")
            seen += 1
            if seen == leave_after:
                break  # leaving the block closes the connection: the adapter sees the client go
    raise CANCELLED_BY_US


# --- gRPC requests -----------------------------------------------------------------------------


def grpc_request(rng: random.Random, **fields) -> chat_pb2.ChatCompletionRequest:
    fields.setdefault("max_tokens", rng.randint(16, 48))
    return chat_pb2.ChatCompletionRequest(
        model=MODEL_ID,
        messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text=rng.choice(PROMPTS))],
        temperature=rng.choice((0.0, 0.9)),
        seed=rng.randrange(1 << 31),
        **fields,
    )


async def grpc_unary(rng: random.Random, http, stub: chat_pb2_grpc.ChatCompletionsStub) -> None:
    n = rng.randint(1, 2)
    request = grpc_request(rng, n=n)
    try:
        answer = await stub.CreateChatCompletion(request)
    except grpc.aio.AioRpcError as error:
        raise grpc_failure(error) from None
    check([c.index for c in answer.choices] == list(range(n)), "choice indices", answer)
    finishes = [FINISH_REASON_NAMES.get(c.finish_reason) for c in answer.choices]
    check(all(reason in ("stop", "length") for reason in finishes), "finish_reason", finishes)
    check(1 <= answer.usage.completion_tokens <= n * request.max_tokens, "completion_tokens", answer.usage)


async def grpc_deadline(rng: random.Random, http, stub: chat_pb2_grpc.ChatCompletionsStub) -> None:
    request = grpc_request(rng, max_tokens=512, logit_bias=NO_END)
    call = stub.StreamChatCompletion(request, timeout=rng.uniform(0.3, 3.0))
    try:
        chunks = [chunk async for chunk in call]
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise Failure("deadline exceeded", expected=True) from None
        raise grpc_failure(error) from None
    finishes = [FINISH_REASON_NAMES.get(c.finish_reason) for chunk in chunks for c in chunk.choices if c.finish_reason]
    check(finishes == ["length"], "finish_reason", finishes)


async def grpc_cancel(rng: random.Random, http, stub: chat_pb2_grpc.ChatCompletionsStub) -> None:
    call = stub.StreamChatCompletion(grpc_request(rng, max_tokens=512, logit_bias=NO_END))
    leave_after = rng.randint(1, 8)
    try:
        seen = 0
        async for _ in call:
            seen += 1
            if seen == leave_after:
                break
    except grpc.aio.AioRpcError as error:
        raise grpc_failure(error) from None
    call.cancel()
    raise CANCELLED_BY_US


Kind = Callable[[random.Random, httpx.AsyncClient, chat_pb2_grpc.ChatCompletionsStub], Awaitable[None]]
KINDS: dict[str, tuple[Kind, int]] = {  # name: (request, weight in the mix)
    "rest-stream": (rest_stream, 4),
    "rest-n": (rest_n, 2),
    "rest-json": (rest_json, 2),
    "rest-tools": (rest_tools, 2),
    "rest-disconnect": (rest_disconnect, 1),
    "grpc-unary": (grpc_unary, 2),
    "grpc-deadline": (grpc_deadline, 1),
    "grpc-cancel": (grpc_cancel, 1),
}


# --- the load ----------------------------------------------------------------------------------


async def one_request(kind: str, rng: random.Random, http, stub, timeout: float) -> Outcome:
    request, _ = KINDS[kind]
    start = time.monotonic()
    try:
        await asyncio.wait_for(request(rng, http, stub), timeout)
        outcome, expected, detail = "ok", True, ""
    except Failure as failure:
        outcome, expected, detail = failure.outcome, failure.expected, failure.detail
    except TimeoutError:
        outcome, expected, detail = f"over {timeout:.0f} s", False, ""
    except httpx.HTTPError as error:
        outcome, expected, detail = f"transport: {type(error).__name__}", False, str(error)[:300]
    except (KeyError, TypeError, ValueError) as error:  # an answer without the fields OpenAI's shape has
        outcome, expected, detail = "bad answer: shape", False, repr(error)[:300]
    except Exception as error:  # noqa: BLE001 - anything else is a failure to count, not a reason to stop the run
        outcome, expected, detail = f"exception: {type(error).__name__}", False, str(error)[:300]
    return Outcome(kind, outcome, expected, time.monotonic() - start, detail)


async def run_load(seconds: float, args, rngs: list[random.Random], http, stub) -> list[Outcome]:
    """Every client sends requests back to back until `seconds` have passed; each finishes the
    request in hand (bounded by --request-timeout) and none starts another."""
    end = time.monotonic() + seconds
    names = list(KINDS)
    weights = [weight for _, weight in KINDS.values()]
    outcomes: list[Outcome] = []

    async def client(rng: random.Random) -> None:
        while time.monotonic() < end:
            kind = rng.choices(names, weights)[0]
            outcomes.append(await one_request(kind, rng, http, stub, args.request_timeout))

    await asyncio.gather(*(client(rng) for rng in rngs))
    return outcomes


async def probe_held_slots(stub: chat_pb2_grpc.ChatCompletionsStub, parallel: int) -> tuple[int, list[Outcome]]:
    """`parallel` long streams at once; how many could start only after another had finished, and
    the probe's own failures (none: -1 and a failure each otherwise)."""
    request = chat_pb2.ChatCompletionRequest(
        model=MODEL_ID,
        messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, text=PROMPTS[0])],
        max_tokens=PROBE_TOKENS,
        temperature=0.0,
        logit_bias=NO_END,
    )

    async def stream() -> tuple[float, float]:
        first = last = 0.0
        async for _ in stub.StreamChatCompletion(request, timeout=600):
            last = time.monotonic()
            first = first or last
        return first, last

    start = time.monotonic()
    results = await asyncio.gather(*(stream() for _ in range(parallel)), return_exceptions=True)
    failures = [
        Outcome("probe", f"probe failed: {type(r).__name__}", False, time.monotonic() - start, str(r)[:300])
        for r in results
        if isinstance(r, Exception)
    ]
    if failures:
        return -1, failures
    first_end = min(last for _, last in results)
    return sum(first > first_end for first, _ in results), []


# --- processes ---------------------------------------------------------------------------------


def rss_kib(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM (the peak) of a process, in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


@dataclass
class Report:
    args: dict
    measured_seconds: float = 0.0
    outcomes: list[dict] = field(default_factory=list)
    warmup_unexpected: list[dict] = field(default_factory=list)
    rss_start_kib: dict[str, int] = field(default_factory=dict)
    rss_end_kib: dict[str, int] = field(default_factory=dict)
    rss_peak_kib: dict[str, int] = field(default_factory=dict)
    rss_samples_kib: dict[str, list[int]] = field(default_factory=dict)
    probe_slots_held: int = -1
    shutdown_line: dict[str, int] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def print_report(report: Report, outcomes: list[Outcome]) -> bool:
    """Prints the tables; returns whether the run met issue 18's goal."""
    clients, parallel, minutes = report.args["clients"], report.args["parallel"], report.args["minutes"]
    drain = report.measured_seconds - minutes * 60
    print(f"\n## Soak: {clients} clients, {minutes:g} min of load (+{drain:.0f} s to end the requests in hand)", end="")
    print(f", --parallel {parallel}")
    print("\n| kind | requests | ok | expected errors | unexpected errors | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in [*KINDS, "all"]:
        mine = [o for o in outcomes if kind in (o.kind, "all")]
        ok = [o.seconds * 1000 for o in mine if o.outcome == "ok"]
        expected = sum(o.expected and o.outcome != "ok" for o in mine)
        unexpected = sum(not o.expected for o in mine)
        p50, p99 = percentile(ok, 0.5), percentile(ok, 0.99)
        print(f"| {kind} | {len(mine)} | {len(ok)} | {expected} | {unexpected} | {p50:.0f} | {p99:.0f} |")
    errors = collections.Counter((o.kind, o.outcome, o.expected) for o in outcomes if o.outcome != "ok")
    print("\n| kind | outcome | expected | count |")
    print("|---|---|---|---:|")
    for (kind, outcome, expected), count in sorted(errors.items()):
        print(f"| {kind} | {outcome} | {'yes' if expected else 'NO'} | {count} |")
    for outcome in [o for o in outcomes if not o.expected][:10]:
        print(f"  unexpected: {outcome.kind}: {outcome.outcome}: {outcome.detail}")
    if report.warmup_unexpected:
        print(f"  warm-up: {len(report.warmup_unexpected)} unexpected errors, e.g. {report.warmup_unexpected[0]}")

    print("\n| process | RSS start MiB | RSS end MiB | growth | peak MiB | samples during the load, MiB |")
    print("|---|---:|---:|---:|---:|---|")
    growths = {}
    for name in report.rss_start_kib:
        start, end = report.rss_start_kib[name], report.rss_end_kib[name]
        growths[name] = (end - start) / start
        samples = " ".join(f"{kib / 1024:.0f}" for kib in report.rss_samples_kib[name])
        print(
            f"| {name} | {start / 1024:.1f} | {end / 1024:.1f} | {growths[name]:+.1%} | "
            f"{report.rss_peak_kib[name] / 1024:.1f} | {samples} |"
        )
    line = report.shutdown_line
    held_at_shutdown = (
        f"{line['active']} sequences active, {line['waiting']} waiting, {line['in_use']} of {line['slots']} in use"
        if line
        else "no line found"
    )
    print(f"\nslots held at idle: probe {report.probe_slots_held} of {parallel}; shutdown log: {held_at_shutdown}")
    print(f"exit codes: {report.exit_codes}")

    unexpected = sum(not o.expected for o in outcomes) + len(report.warmup_unexpected)
    held = report.probe_slots_held != 0 or not line or line["active"] + line["waiting"] + line["in_use"] > 0
    verdicts = {
        "0 unexpected errors": unexpected == 0,
        f"RSS growth <= {GOAL_RSS_GROWTH:.0%}": all(g <= GOAL_RSS_GROWTH for g in growths.values()),
        "0 slots held at idle": not held,
    }
    print("goal: " + "; ".join(f"{name}: {'met' if met else 'MISSED'}" for name, met in verdicts.items()))
    return all(verdicts.values())


async def soak(args, service: LocalServer, adapter: LocalServer, grpc_port: int, rest_port: int) -> Report:
    report = Report(args={key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()})
    processes = {"service": service.pid, "adapter": adapter.pid}
    master = random.Random(args.seed)
    rngs = [random.Random(master.randrange(1 << 62)) for _ in range(args.clients)]
    limits = httpx.Limits(max_connections=args.clients * 2, max_keepalive_connections=args.clients * 2)
    timeout = httpx.Timeout(args.request_timeout)
    async with (
        httpx.AsyncClient(base_url=f"http://{LOOPBACK}:{rest_port}", limits=limits, timeout=timeout) as http,
        grpc.aio.insecure_channel(f"{LOOPBACK}:{grpc_port}") as channel,
    ):
        stub = chat_pb2_grpc.ChatCompletionsStub(channel)
        print(f"warm-up: {args.warmup:.0f} s", flush=True)
        warmup = await run_load(args.warmup, args, rngs, http, stub)
        report.warmup_unexpected = [asdict(o) for o in warmup if not o.expected]
        report.rss_start_kib = {name: rss_kib(pid)[0] for name, pid in processes.items()}
        report.rss_samples_kib = {name: [] for name in processes}

        async def sample_rss() -> None:
            while True:
                await asyncio.sleep(args.sample_every)
                for name, pid in processes.items():
                    report.rss_samples_kib[name].append(rss_kib(pid)[0])

        print(f"load: {args.minutes:g} min at {args.clients} clients", flush=True)
        sampler = asyncio.create_task(sample_rss())
        start = time.monotonic()
        outcomes = await run_load(args.minutes * 60, args, rngs, http, stub)
        report.measured_seconds = time.monotonic() - start
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        for name, pid in processes.items():
            report.rss_end_kib[name], report.rss_peak_kib[name] = rss_kib(pid)
        report.probe_slots_held, probe = await probe_held_slots(stub, args.parallel)
        outcomes += probe
    report.outcomes = [asdict(o) for o in outcomes]
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30, help="length of the measured load (default: 30)")
    parser.add_argument("--clients", type=int, default=24, help="concurrent clients (default: 24)")
    parser.add_argument("--warmup", type=float, default=60, help="seconds of load before the start (default: 60)")
    parser.add_argument("--parallel", type=int, default=8, help="the service's --parallel (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clients' choices (default: 0)")
    parser.add_argument(
        "--request-timeout", type=float, default=300, help="seconds after which a request is abandoned (default: 300)"
    )
    parser.add_argument("--sample-every", type=float, default=60, help="seconds between RSS samples (default: 60)")
    parser.add_argument("--json", type=Path, help="also write the report and every outcome here")
    args = parser.parse_args()

    env = {key: value for key, value in os.environ.items() if key != "CHATRPC_API_KEYS"}
    grpc_port, rest_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="chatrpc-soak-") as log_dir:
        service_log = Path(log_dir) / "service.log"
        # At info, the scheduler's line as it stops: what it still holds (read below).
        command = grpc_command(grpc_port, "--parallel", str(args.parallel))
        command[command.index("--log-level") + 1] = "info"
        service = LocalServer("service", command, f"grpc://{LOOPBACK}:{grpc_port}", service_log, env=env, cwd=REPO)
        adapter = None
        try:
            service.wait_ready()
            adapter = LocalServer(
                "adapter",
                rest_command(rest_port, grpc_port),
                f"http://{LOOPBACK}:{rest_port}/health",
                Path(log_dir) / "adapter.log",
                env=env,
                cwd=REPO,
            )
            adapter.wait_ready()
            report = asyncio.run(soak(args, service, adapter, grpc_port, rest_port))
        finally:
            codes = {}
            for name, server in (("service", service), ("adapter", adapter)):
                if server is not None:
                    server.process.send_signal(signal.SIGTERM)
                    try:
                        codes[name] = server.process.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        server.stop()
                        codes[name] = None
        report.exit_codes = codes
        match = SHUTDOWN_LINE.search(service.log())
        if match:
            report.shutdown_line = {key: int(value) for key, value in match.groupdict().items() if key != "model"}
    outcomes = [Outcome(**o) for o in report.outcomes]
    met = print_report(report, outcomes)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
