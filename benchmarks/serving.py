"""Serving benchmark: a bounded load generator for streaming chat completions, loopback only.

    .venv/bin/python benchmarks/serving.py --openai-url http://127.0.0.1:8000/v1   # any OpenAI-compatible server
    .venv/bin/python benchmarks/serving.py --grpc 127.0.0.1:50051                  # chatrpc's gRPC service
    .venv/bin/python benchmarks/serving.py --compare [--json results.json]          # starts, measures, stops them all
    .venv/bin/python benchmarks/serving.py --rest-overhead --overhead-pairs 1000    # starts chatrpc: REST vs gRPC only

Every request streams, is greedy (temperature 0) and asks for `--max-tokens` (128) tokens with the
model's end tokens banned through logit_bias, so that each one generates exactly that many; the
prompts cycle over a fixed list of 16 short ones. Per concurrency level (1, 4, 8, 16) a fixed number
of requests runs on that many concurrent streams, under a wall-clock cap: nothing new starts after
it, and what is still running at twice the cap is cancelled and counted as an error.

Per level:
  aggregate tok/s    completion tokens of all requests / wall time from the first send to the last end
  per-stream tok/s   median over requests of (tokens - 1) / (last token's arrival - first token's arrival)
  TTFT p50 / p95     time from sending a request to its first content token
  e2e p50 / p95      time from sending a request to the end of its stream
  errors             requests that failed, were cancelled by the cap, or ended with fewer tokens
  other load         (--compare) the most, over the rounds, of the CPUs' time that processes other
                     than this benchmark and its servers took during the level
Tokens are counted from the usage chunk when the server sends one (stream_options.include_usage),
else as content chunks. Also measured:
  multi-turn         a chat of `--turns` (6) turns, each request resending the whole history (the
                     previous answers and a new question); the TTFT of each turn. Once per pause of
                     `--pauses` (0,2): the seconds between an answer and the next question, 0 for
                     back to back, 2 for a user who reads and types (time in which a server may
                     prefill the answer again, as chatrpc does with --fast-nondeterministic:
                     docs/engine.md, "Idle prefill")
  REST overhead      (--compare, --rest-overhead) latency of one-token streaming requests through
                     REST and through gRPC, interleaved: the p50s, their difference, and the median
                     of per-round differences; REST is timed with a bare HTTP/1.1 client on
                     httptools, and also with aiohttp and httpx

--compare runs chatrpc (`chatrpc serve --parallel 8`) and its peers on free loopback ports and the
same model: llama.cpp's own llama-server (built by llama_server.py from the llama.cpp that
llama-cpp-python vendors), with and without its n-gram speculation, at the same `--parallel`; and
llama-cpp-python's server (`python -m llama_cpp.server`, the `llama-cpp-python[server]` extra,
through llama_cpp_peer.py). It measures chatrpc via REST and via gRPC, chatrpc without speculation
(`--speculative-tokens 0`), llama-server and llama-cpp-python at every level, and at one stream
only llama-cpp-python with its own prompt-lookup speculation and with issue 5's flags (its
defaults); the chat also runs on a chatrpc with `--no-prefix-cache`. `--target` picks a subset.
It prints markdown tables of the medians over
`--repeats` (2) rounds and the ratios issue 5 asks about; in each round every target runs in turn,
as do the chats (one chat per target, `--chat-repeats` times), so that drifting load on a shared
machine falls on all of them alike. Before each level (and each chat) the run waits, up to
`--quiet-wait` seconds, for every other process (the servers too) to leave the CPUs idle, and
measures a level again (up to `--retries` times) when other processes took more than
`--quiet-below` of the CPUs during it: llama.cpp's threads wait for each other at every step, so
one busy core slows decode many times over.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import grpc
import httptools
import httpx
import llama_server  # benchmarks/, the script's own folder

from chatrpc.local_server import LocalServer, free_port, serve_command
from chatrpc.v1 import chat_pb2, chat_pb2_grpc
from chatrpc.v1.wire import ROLES

REPO = Path(__file__).resolve().parent.parent
MODEL_ID = "gemma-3-270m"
END_TOKENS = (1, 106, 212)  # Gemma 3's <eos>, <end_of_turn> and the other end-of-generation token
LEVELS = (1, 4, 8, 16)
# The side targets of --compare, each measured only where it shows something (see run_compare).
ISSUE_PEER = "llama-cpp-python, issue's flags"
LOOKUP_PEER = "llama-cpp-python + prompt lookup"
NO_SPEC_REST = "chatrpc REST, no speculation"
NO_SPEC_GRPC = "chatrpc gRPC, no speculation"
NO_CACHE = "chatrpc gRPC, no prefix cache"
LLAMA_SERVER = "llama-server"
LLAMA_SERVER_NGRAM = "llama-server + n-gram"
LLAMA_CPP_PYTHON = "llama-cpp-python"
COMPARE_TARGETS = (
    "chatrpc REST",
    "chatrpc gRPC",
    NO_SPEC_REST,
    NO_SPEC_GRPC,
    LLAMA_SERVER,
    LLAMA_SERVER_NGRAM,
    LLAMA_CPP_PYTHON,
    LOOKUP_PEER,
    ISSUE_PEER,
    NO_CACHE,
)
# One wave of requests per level (two at one stream), to keep a round of --compare short: the peer
# serves one request at a time.
DEFAULT_REQUESTS = {1: 2, 4: 4, 8: 8, 16: 16}

PROMPTS = [
    "Explain how a lighthouse works.",
    "Write a short poem about autumn rain.",
    "What are the main causes of ocean tides?",
    "Describe a busy market in the morning.",
    "Give three tips for learning a new language.",
    "Why is the sky blue?",
    "Tell a story about a robot who learns to paint.",
    "Summarise the water cycle for a child.",
    "What makes a good cup of coffee?",
    "Describe the life of a honeybee.",
    "How do trains stay on their tracks?",
    "Write a letter to a friend about a trip to the mountains.",
    "What is the difference between weather and climate?",
    "Explain how bread rises.",
    "Describe a city at night from a rooftop.",
    "List some ways to save energy at home.",
]
CHAT_TURNS = [
    "I want to plan a small vegetable garden. Where should I start?",
    "Which vegetables are easiest for a beginner?",
    "How often should I water them?",
    "What can I do about slugs?",
    "When should I harvest the tomatoes?",
    "Can you summarise the plan in a few steps?",
]


# --- one request -------------------------------------------------------------------------------


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    ttft: float = 0.0  # seconds to the first content token
    latency: float = 0.0  # seconds to the end of the stream
    tokens: int = 0
    text: str = ""
    first_arrival: float = 0.0
    last_arrival: float = 0.0

    @property
    def stream_rate(self) -> float | None:
        span = self.last_arrival - self.first_arrival
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else None


class StreamTimer:
    """Turns content arrivals into a RequestResult; times are from the send."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.parts: list[str] = []
        self.first = self.last = 0.0
        self.usage_tokens: int | None = None

    def content(self, text: str) -> None:
        now = time.perf_counter() - self.start
        if not self.parts:
            self.first = now
        self.last = now
        self.parts.append(text)

    def result(self) -> RequestResult:
        tokens = self.usage_tokens if self.usage_tokens is not None else len(self.parts)
        return RequestResult(
            ok=bool(self.parts), error="" if self.parts else "no content", ttft=self.first,
            latency=time.perf_counter() - self.start, tokens=tokens, text="".join(self.parts),
            first_arrival=self.first, last_arrival=self.last,
        )  # fmt: skip


class OpenAIClient:
    """Streaming chat completions over HTTP with server-sent events, as any OpenAI client sends them."""

    def __init__(self, base_url: str, model: str = MODEL_ID, api_key: str | None = None) -> None:
        require_loopback(urlsplit(base_url).hostname or "")
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.http = httpx.AsyncClient(
            headers=self.headers,
            timeout=httpx.Timeout(600, connect=10),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    def body(self, messages: list[dict], max_tokens: int) -> dict:
        return {
            "model": self.model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0, "max_tokens": max_tokens, "logit_bias": {str(t): -100 for t in END_TOKENS},
        }  # fmt: skip

    @staticmethod
    def event(line: str, timer: StreamTimer) -> bool:
        """Reads one line of the event stream into `timer`; False at `data: [DONE]`."""
        if not line.startswith("data:"):
            return True
        data = line[5:].strip()
        if data == "[DONE]":
            return False
        chunk = json.loads(data)
        if chunk.get("usage"):
            timer.usage_tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices", []):
            if choice.get("delta", {}).get("content"):
                timer.content(choice["delta"]["content"])
        return True

    async def stream(self, messages: list[dict], max_tokens: int) -> RequestResult:
        body = self.body(messages, max_tokens)
        timer = StreamTimer()
        try:
            async with self.http.stream("POST", self.url, json=body) as response:
                if response.status_code != 200:
                    body_start = (await response.aread())[:200]
                    return RequestResult(ok=False, error=f"HTTP {response.status_code}: {body_start!r}")
                async for line in response.aiter_lines():
                    if not self.event(line, timer):
                        break
        except (httpx.HTTPError, json.JSONDecodeError) as error:
            return RequestResult(ok=False, error=f"{type(error).__name__}: {error}")
        return timer.result()

    async def close(self) -> None:
        await self.http.aclose()


class LeanOpenAIClient(OpenAIClient):
    """The same requests on aiohttp, whose HTTP parser is C (llhttp): a client library beside
    RawHttpClient in the REST overhead, as is httpx, which parses HTTP in pure Python (h11)."""

    def __init__(self, base_url: str, model: str = MODEL_ID, api_key: str | None = None) -> None:
        super().__init__(base_url, model, api_key)
        self.session: aiohttp.ClientSession | None = None

    async def stream(self, messages: list[dict], max_tokens: int) -> RequestResult:
        if self.session is None:  # made inside the running loop, as aiohttp wants
            self.session = aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=600))
        body = self.body(messages, max_tokens)
        timer = StreamTimer()
        try:
            async with self.session.post(self.url, json=body) as response:
                if response.status != 200:
                    body_start = (await response.read())[:200]
                    return RequestResult(ok=False, error=f"HTTP {response.status}: {body_start!r}")
                async for line in response.content:
                    if not self.event(line.decode(), timer):
                        break
        except (aiohttp.ClientError, json.JSONDecodeError) as error:
            return RequestResult(ok=False, error=f"{type(error).__name__}: {error}")
        return timer.result()

    async def close(self) -> None:
        await super().close()
        if self.session is not None:
            await self.session.close()


class _SSEResponse:
    """httptools' callbacks for one streamed response: the body's events go to the timer."""

    def __init__(self, timer: StreamTimer) -> None:
        self.timer, self.pending, self.done, self.complete = timer, b"", False, False
        self.body_start = b""

    def on_body(self, body: bytes) -> None:
        if len(self.body_start) < 200:  # for the error of a refused request
            self.body_start += body[: 200 - len(self.body_start)]
        self.pending += body
        *events, self.pending = self.pending.split(b"\n\n")
        for event in events:
            if not self.done and not OpenAIClient.event(event.decode(), self.timer):
                self.done = True

    def on_message_complete(self) -> None:
        self.complete = True


class RawHttpClient(OpenAIClient):
    """The same requests as bytes on one kept-alive loopback connection, the answer parsed by
    httptools (llhttp, the parser uvicorn uses): the REST overhead's ruler.

    An HTTP client library costs time of its own on every request, and a 2-core machine runs it
    cold, after the model's threads have filled the caches: against the same adapter aiohttp and
    httpx add to a one-token request over this client (the run prints by how much;
    docs/benchmarks.md, "Serving"). The gRPC side runs grpc's own client, which the adapter also runs
    inside, so what REST adds over gRPC through this client is the adapter's work and its two extra hops.
    """

    def __init__(self, base_url: str, model: str = MODEL_ID, api_key: str | None = None) -> None:
        super().__init__(base_url, model, api_key)
        parts = urlsplit(self.url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.head = "".join(
            [f"POST {parts.path} HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-type: application/json\r\n"]
            + [f"{name}: {value}\r\n" for name, value in self.headers.items()]
        )
        self.connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def stream(self, messages: list[dict], max_tokens: int) -> RequestResult:
        body = json.dumps(self.body(messages, max_tokens)).encode()
        timer = StreamTimer()
        try:
            if self.connection is None:
                self.connection = await asyncio.open_connection(*self.address)
            reader, writer = self.connection
            writer.write(f"{self.head}content-length: {len(body)}\r\n\r\n".encode() + body)
            response = _SSEResponse(timer)
            parser = httptools.HttpResponseParser(response)
            while not response.complete:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the server closed the connection")
                parser.feed_data(data)
        except (OSError, httptools.HttpParserError, json.JSONDecodeError) as error:
            await self.close()
            return RequestResult(ok=False, error=f"{type(error).__name__}: {error}")
        if parser.get_status_code() != 200:
            return RequestResult(ok=False, error=f"HTTP {parser.get_status_code()}: {response.body_start!r}")
        return timer.result()

    async def close(self) -> None:
        await super().close()
        if self.connection is not None:
            self.connection[1].close()
            self.connection = None


class GrpcClient:
    """chatrpc's StreamChatCompletion, called directly."""

    def __init__(self, target: str, model: str = MODEL_ID, api_key: str | None = None) -> None:
        require_loopback(urlsplit(f"//{target}").hostname or "")
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = chat_pb2_grpc.ChatCompletionsStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self.model = model

    async def stream(self, messages: list[dict], max_tokens: int) -> RequestResult:
        request = chat_pb2.ChatCompletionRequest(
            model=self.model, temperature=0, max_tokens=max_tokens, stream=True,
            messages=[chat_pb2.ChatMessage(role=ROLES[m["role"]], text=m["content"]) for m in messages],
            logit_bias={t: -100 for t in END_TOKENS},
            stream_options=chat_pb2.StreamOptions(include_usage=True),
        )  # fmt: skip
        timer = StreamTimer()
        try:
            async for chunk in self.stub.StreamChatCompletion(request, metadata=self.metadata):
                if chunk.HasField("usage"):
                    timer.usage_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta.content:
                        timer.content(choice.delta.content)
        except grpc.aio.AioRpcError as error:
            return RequestResult(ok=False, error=f"{error.code().name}: {error.details()}")
        return timer.result()

    async def close(self) -> None:
        await self.channel.close()


def require_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    sys.exit(f"refusing {host!r}: this benchmark only talks to loopback addresses")


# --- a concurrency level, a chat ---------------------------------------------------------------


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    completed: int
    errors: int
    wall: float
    tokens: int
    aggregate_rate: float
    stream_rate: float
    ttft_p50: float
    ttft_p95: float
    latency_p50: float
    latency_p95: float
    foreign_load: float = 0.0  # share of the machine's CPUs other processes used during the level
    tokens_per_request: list[int] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def run_level(client, concurrency: int, requests: int, max_tokens: int, cap: float) -> LevelResult:
    prompts = iter(range(requests))
    results: list[RequestResult] = []
    skipped = 0
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal skipped
        for index in prompts:
            if time.perf_counter() - start > cap:
                skipped += 1
                return
            messages = [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]
            result = await client.stream(messages, max_tokens)
            if result.ok and result.tokens != max_tokens:
                result.ok, result.error = False, f"{result.tokens} tokens instead of {max_tokens}"
            results.append(result)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    _, running = await asyncio.wait(tasks, timeout=2 * cap)
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)  # let the cancelled streams close
    cancelled = skipped + sum(1 for _ in prompts) + len(running)  # never started, or cut off by the cap
    wall = time.perf_counter() - start
    good = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in results)
    rates = [r.stream_rate for r in good if r.stream_rate is not None]
    return LevelResult(
        concurrency=concurrency, requests=requests, completed=len(good), errors=requests - len(good), wall=wall,
        tokens=tokens, aggregate_rate=tokens / wall,
        stream_rate=statistics.median(rates) if rates else float("nan"),
        ttft_p50=percentile([r.ttft for r in good], 0.5), ttft_p95=percentile([r.ttft for r in good], 0.95),
        latency_p50=percentile([r.latency for r in good], 0.5),
        latency_p95=percentile([r.latency for r in good], 0.95),
        tokens_per_request=[r.tokens for r in results],
        error_samples=[r.error for r in results if not r.ok][:3] + ([f"{cancelled} cut by the cap"] * bool(cancelled)),
    )  # fmt: skip


async def run_chat(client, turns: int, max_tokens: int, pause: float = 0.0) -> list[dict]:
    """One chat, the whole history resent each turn, `pause` seconds after each answer; the TTFT of each turn."""
    messages: list[dict] = []
    report = []
    for turn in range(turns):
        if turn:
            await asyncio.sleep(pause)
        messages.append({"role": "user", "content": CHAT_TURNS[turn % len(CHAT_TURNS)]})
        result = await client.stream(messages, max_tokens)
        report.append(
            {
                "turn": turn + 1,
                "ok": result.ok,
                "ttft": result.ttft,
                "tokens": result.tokens,
                "history_chars": sum(len(m["content"]) for m in messages),
                "error": result.error,
            }
        )
        if not result.ok:
            break
        messages.append({"role": "assistant", "content": result.text})
    return report


async def rest_overhead(
    rest_url: str,
    grpc_client: GrpcClient,
    rest_httpx: OpenAIClient,
    pairs: int,
    load: ForeignLoad,
    args: argparse.Namespace,
) -> dict:
    """Latency of one-token requests through REST and directly through gRPC, interleaved.

    Each round sends one request by each path, in an order shuffled from round to round (a fixed
    seed): what ran just before a request (which processes' caches the last prefill evicted, the
    engine's state) matters, and a rotation would put each path always after the same other one. A
    few rounds first warm the connections up. The overhead is the median over rounds of REST's
    latency minus gRPC's in the same round: a prefill's time varies by several ms from one request
    to the next, which the difference of two p50s carries whole and a per-round difference mostly
    cancels. REST is timed with RawHttpClient; aiohttp (a C parser too) and httpx show what a
    client library adds.
    """
    raw, lean = RawHttpClient(rest_url), LeanOpenAIClient(rest_url)
    clients = {"rest": raw, "rest_aiohttp": lean, "rest_httpx": rest_httpx, "grpc": grpc_client}
    names = list(clients)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    rounds: list[dict[str, float]] = []
    await load.wait_quiet(args.quiet_below, args.quiet_wait)
    before = load.snapshot()
    order = random.Random(5)
    try:
        for index in range(-3, pairs):
            latencies = {}
            for name in order.sample(names, len(names)):
                result = await clients[name].stream(messages, 1)
                if result.ok:
                    latencies[name] = result.latency
            if index >= 0:
                rounds.append(latencies)
    finally:
        await raw.close()
        await lean.close()
    foreign_load = load.since(before)

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    report = {"pairs": pairs, "foreign_load": foreign_load}
    for name in names:
        report[f"{name}_p50"] = median([r[name] for r in rounds if name in r])
    for name in names[:-1]:
        suffix = name.removeprefix("rest")
        report[f"overhead{suffix}_p50"] = report[f"{name}_p50"] - report["grpc_p50"]
        report[f"overhead{suffix}_paired"] = median([r[name] - r["grpc"] for r in rounds if name in r and "grpc" in r])
    return report


# --- the rest of the machine ------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_ticks() -> int:
    """CPU time of everything on the machine (user, system, interrupts, steal), in clock ticks."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return user + nice + system + irq + softirq + steal


def process_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


class ForeignLoad:
    """The share of the machine's CPUs used by processes other than this benchmark and its servers.

    The machine is shared: a level that ran beside someone's test suite is flagged, and each level
    waits (a bounded time) for the machine to be quiet before it starts.
    """

    def __init__(self, own_roots: list[int], *, knows_servers: bool) -> None:
        self.own = sorted({pid for root in own_roots for pid in descendants(root)})
        self.knows_servers = knows_servers  # else a level's share would count the server's own work
        self.cpus = os.cpu_count() or 1

    def snapshot(self, own: list[int] | None = None) -> tuple[float, int, int]:
        return time.monotonic(), machine_busy_ticks(), process_ticks(self.own if own is None else own)

    def since(self, before: tuple[float, int, int], own: list[int] | None = None) -> float:
        now = self.snapshot(own)
        elapsed = (now[0] - before[0]) * CLOCK_TICKS * self.cpus
        return max(0.0, ((now[1] - before[1]) - (now[2] - before[2])) / elapsed) if elapsed > 0 else 0.0

    async def wait_quiet(self, threshold: float, timeout: float) -> float:
        """Wait until every process but this one, the servers too, used under `threshold` of the
        CPUs over one second; the last share seen. A server still busy after its last level (with
        --fast-nondeterministic chatrpc's idle prefill of what 16 streams generated takes seconds)
        would slow the next target, which may be another server."""
        deadline = time.monotonic() + timeout
        only_me = [os.getpid()]
        while True:
            before = self.snapshot(only_me)
            await asyncio.sleep(1.0)
            share = self.since(before, only_me)
            if share < threshold or time.monotonic() > deadline:
                return share


# --- the servers -------------------------------------------------------------------------------


def start(name: str, command: list[str], health_url: str, log_dir: Path) -> LocalServer:
    """A server for the run, with no API keys (the clients send none), its log in `log_dir`."""
    env = {key: value for key, value in os.environ.items() if key != "CHATRPC_API_KEYS"}
    return LocalServer(name, command, health_url, log_dir / f"{name}.log", env=env, cwd=REPO)


def chatrpc_command(grpc_port: int, rest_port: int, parallel: int, *flags: str) -> list[str]:
    return serve_command(grpc_port, rest_port, "--parallel", str(parallel), *flags)


# llama-cpp-python's server through a launcher that keeps it alive on CPUs with AMX (its docstring).
PEER_LAUNCHER = str(REPO / "benchmarks" / "llama_cpp_peer.py")


def peer_command(port: int, model_path: str, threads: int) -> list[str]:
    # Its best settings here: all cores for decode too (its default is one thread), flash attention
    # as chatrpc has it, logits only for the last position (the default computes them for every
    # prompt token), and queued requests wait instead of interrupting the running one.
    return [
        sys.executable, PEER_LAUNCHER, "--model", model_path, "--model_alias", MODEL_ID,
        "--chat_format", "gemma", "--n_ctx", "4096", "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--flash_attn", "True", "--logits_all", "False", "--interrupt_requests", "False", "--verbose", "False",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def lookup_peer_command(port: int, model_path: str, threads: int) -> list[str]:
    # Its own speculative decoding, prompt lookup as chatrpc's (with its default of 10 guesses; it
    # computes logits for every prompt token then).
    return [*peer_command(port, model_path, threads), "--draft_model", "prompt-lookup-decoding"]


def issue_peer_command(port: int, model_path: str) -> list[str]:
    # The peer exactly as issue 5 names it (`python -m llama_cpp.server --chat_format gemma`): its
    # own defaults, one decode thread on this machine among them.
    return [
        sys.executable, PEER_LAUNCHER, "--model", model_path, "--model_alias", MODEL_ID, "--chat_format", "gemma",
        "--verbose", "False", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def llama_server_command(binary: Path, port: int, model_path: str, threads: int, parallel: int) -> list[str]:
    # llama.cpp's own server (benchmarks/llama_server.py builds it from the llama.cpp chatrpc runs
    # on) with chatrpc's settings: as many slots and the same context per slot, the model's own
    # chat template, flash attention on, all cores; its defaults otherwise (continuous batching,
    # repacked weights where the CPU has a kernel for them).
    return [
        str(binary), "--model", model_path, "--alias", MODEL_ID, "--jinja", "--parallel", str(parallel),
        "--ctx-size", str(4096 * parallel), "--flash-attn", "on", "--threads", str(threads),
        "--threads-batch", str(threads), "--no-webui", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def llama_server_ngram_command(binary: Path, port: int, model_path: str, threads: int, parallel: int) -> list[str]:
    # Its own speculation from the sequence's history: n-gram lookup with chatrpc's longest n-gram
    # (4; its default of 12 rarely matches in a 128-token answer) and its default of 3 guesses.
    return [
        *llama_server_command(binary, port, model_path, threads, parallel),
        "--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "4",
    ]  # fmt: skip


# --- the runs ----------------------------------------------------------------------------------


def requests_for(level: int, args: argparse.Namespace) -> int:
    return args.requests or DEFAULT_REQUESTS.get(level, 2 * level)


async def measure(
    clients: dict,
    load: ForeignLoad,
    args: argparse.Namespace,
    *,
    only_levels: dict | None = None,
    chat_with: list[str] | None = None,
) -> dict:
    """`repeats` rounds; in each, every target runs every level (or those of `only_levels`, by
    target); then one chat per target (or per target of `chat_with`)."""
    only_levels = only_levels or {}
    target_levels = {name: [lv for lv in args.levels if lv in only_levels.get(name, args.levels)] for name in clients}
    levels: dict = {name: {level: [] for level in target_levels[name]} for name in clients}
    chats: dict = {
        chat_key(name, pause): [] for pause in args.pauses for name in clients if chat_with is None or name in chat_with
    }
    for client in clients.values():  # warm-up: connections, the first allocations
        await client.stream([{"role": "user", "content": PROMPTS[0]}], 8)
    for round_index in range(args.repeats):
        for name, client in clients.items():
            for level in target_levels[name]:
                for attempt in range(args.retries + 1):
                    await load.wait_quiet(args.quiet_below, args.quiet_wait)
                    before = load.snapshot()
                    result = await run_level(client, level, requests_for(level, args), args.max_tokens, args.cap)
                    if not load.knows_servers:
                        result.foreign_load = float("nan")
                        break
                    result.foreign_load = load.since(before)
                    if result.foreign_load < args.quiet_below or attempt == args.retries:
                        break
                    log(f"round {round_index + 1} {name:>16} c={level:<2} other load {result.foreign_load:.0%}: again")
                levels[name][level].append(result)
                log(
                    f"round {round_index + 1} {name:>16} c={level:<2} {result.aggregate_rate:5.1f} tok/s, "
                    f"{result.stream_rate:5.1f} per stream, TTFT p50 {result.ttft_p50 * 1e3:5.0f} ms, "
                    f"other load {result.foreign_load:4.0%}, errors {result.errors}"
                    + (f" {result.error_samples}" if result.errors else "")
                )
    # The chats of all targets take turns (one each, then the next round), so that a slow spell of
    # the machine (the same llama_decode can take much longer in one chat than in the next)
    # falls on every target alike rather than on one target's consecutive chats: turn 6's ratio
    # divides one target's TTFT by another's.
    for pause in args.pauses:
        for _ in range(args.chat_repeats if args.turns else 0):
            for name in clients:
                key = chat_key(name, pause)
                if key not in chats:
                    continue
                for attempt in range(args.retries + 1):
                    await load.wait_quiet(args.quiet_below, args.quiet_wait)
                    before = load.snapshot()
                    chat = await run_chat(clients[name], args.turns, args.max_tokens, pause)
                    share = load.since(before)
                    log(
                        f"chat {key:>16} TTFT ms: "
                        + " ".join(f"{t['ttft'] * 1e3:.0f}" for t in chat)
                        + (f", other load {share:.0%}" if load.knows_servers else "")
                    )
                    if not load.knows_servers or share < args.quiet_below or attempt == args.retries:
                        break
                chats[key].append(chat)
    return {"levels": levels, "chats": chats, "pauses": args.pauses}


def chat_key(name: str, pause: float) -> str:
    return name if pause == 0 else f"{name}, {pause:g} s pauses"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def median_of(results: list[LevelResult], name: str) -> float:
    return statistics.median(getattr(r, name) for r in results)


def level_table(levels: dict) -> list[str]:
    lines = [
        "| target | streams | requests | aggregate tok/s | per-stream tok/s | TTFT p50 ms | TTFT p95 ms "
        "| e2e p50 s | e2e p95 s | errors | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, by_level in levels.items():
        for level, results in by_level.items():
            m = {
                key: median_of(results, key)
                for key in ("aggregate_rate", "stream_rate", "ttft_p50", "ttft_p95", "latency_p50", "latency_p95")
            }
            errors = sum(r.errors for r in results)
            lines.append(
                f"| {name} | {level} | {results[0].requests} × {len(results)} | {m['aggregate_rate']:.1f} "
                f"| {m['stream_rate']:.1f} | {m['ttft_p50'] * 1e3:.0f} | {m['ttft_p95'] * 1e3:.0f} "
                f"| {m['latency_p50']:.2f} | {m['latency_p95']:.2f} | {errors} "
                f"| {percent(max(r.foreign_load for r in results))} |"
            )
    return lines


def percent(share: float) -> str:
    return "–" if share != share else f"{share:.0%}"  # NaN: not measured


def chat_table(chats: dict) -> list[str]:
    names = [name for name, runs in chats.items() if runs]
    if not names:
        return []
    turns = max(len(run) for runs in chats.values() for run in runs)
    lines = [
        "| turn | history chars | " + " | ".join(f"{n} TTFT ms" for n in names) + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for turn in range(turns):
        cells = []
        for name in names:
            values = [run[turn]["ttft"] for run in chats[name] if len(run) > turn and run[turn]["ok"]]
            cells.append(f"{statistics.median(values) * 1e3:.0f}" if values else "–")
        chars = statistics.median(run[turn]["history_chars"] for run in chats[names[0]] if len(run) > turn)
        lines.append(f"| {turn + 1} | {chars:.0f} | " + " | ".join(cells) + " |")
    return lines


def ratio_lines(results: dict) -> list[str]:
    """Each chatrpc target's aggregate tok/s over each peer's, per level; turn 6 with and without the cache."""
    rates = {
        name: {level: median_of(runs, "aggregate_rate") for level, runs in by_level.items() if runs}
        for name, by_level in results["levels"].items()
    }
    ours = [name for name in rates if name.startswith("chatrpc")]
    peers = [name for name in rates if not name.startswith("chatrpc")]
    lines = ["Aggregate tok/s over the peer's (medians):", ""]
    lines += [
        f"- {mine} / {peer}, {level} stream{'s' if level > 1 else ''}: {rates[mine][level] / rates[peer][level]:.2f}x"
        for mine in ours
        for peer in peers
        for level in rates[mine]
        if level in rates[peer]
    ]
    chats = results["chats"]
    last = {name: [run[-1]["ttft"] for run in runs if run and run[-1]["ok"]] for name, runs in chats.items()}
    for pause in results.get("pauses", [0]):
        if not last.get(chat_key(NO_CACHE, pause)):
            continue
        off = statistics.median(last[chat_key(NO_CACHE, pause)])
        for name in ("chatrpc REST", "chatrpc gRPC"):
            if last.get(chat_key(name, pause)):
                on = statistics.median(last[chat_key(name, pause)])
                lines.append(
                    f"- last turn's TTFT, {chat_key(name, pause)} / {chat_key(NO_CACHE, pause)}: "
                    f"{on * 1e3:.0f} / {off * 1e3:.0f} ms = {on / off:.2f}x"
                )
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import llama_cpp

    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"llama-cpp-python {llama_cpp.__version__}, {datetime.date.today().isoformat()}"
    )


async def run_single(args: argparse.Namespace) -> dict:
    client = (
        OpenAIClient(args.openai_url, args.model, args.api_key)
        if args.openai_url
        else GrpcClient(args.grpc, args.model, args.api_key)
    )
    try:
        # The server is idle between levels, so its CPU use then counts as foreign: wait_quiet still works.
        load = ForeignLoad([os.getpid()], knows_servers=False)
        return await measure({args.openai_url or args.grpc: client}, load, args)
    finally:
        await client.close()


async def run_compare(args: argparse.Namespace) -> dict:
    from service.models import embedded_model_path

    log_dir = Path(tempfile.mkdtemp(prefix="chatrpc-serving-"))
    model_path, threads = str(embedded_model_path()), os.cpu_count() or 1
    wanted = set(args.targets or COMPARE_TARGETS)
    servers: dict[str, LocalServer] = {}
    clients: dict = {}

    def chatrpc(name: str, *flags: str) -> tuple[int, int]:
        grpc_port, rest_port = free_port(), free_port()
        command = chatrpc_command(grpc_port, rest_port, args.parallel, *flags)
        servers[name] = start(name, command, f"http://127.0.0.1:{rest_port}/health", log_dir)
        return grpc_port, rest_port

    def peer(name: str, command: list[str], port: int, health: str = "/v1/models") -> str:
        servers[name] = start(name, command, f"http://127.0.0.1:{port}{health}", log_dir)
        return f"http://127.0.0.1:{port}/v1"

    try:
        if wanted & {"chatrpc REST", "chatrpc gRPC"} or args.overhead_pairs:
            grpc_port, rest_port = chatrpc("chatrpc")
            rest_url = f"http://127.0.0.1:{rest_port}/v1"
            clients["chatrpc REST"], clients["chatrpc gRPC"] = (
                OpenAIClient(rest_url),
                GrpcClient(f"127.0.0.1:{grpc_port}"),
            )
        if wanted & {NO_SPEC_REST, NO_SPEC_GRPC}:
            # What prompt-lookup speculation adds.
            grpc_port, rest_port = chatrpc("no-spec", "--speculative-tokens", "0")
            clients[NO_SPEC_REST] = OpenAIClient(f"http://127.0.0.1:{rest_port}/v1")
            clients[NO_SPEC_GRPC] = GrpcClient(f"127.0.0.1:{grpc_port}")
        if NO_CACHE in wanted:
            # The chat only: turn by turn, what the prefix cache saves.
            clients[NO_CACHE] = GrpcClient(f"127.0.0.1:{chatrpc('no-cache', '--no-prefix-cache')[0]}")
        if wanted & {LLAMA_SERVER, LLAMA_SERVER_NGRAM}:
            binary = llama_server.build()
            for name, command in (
                (LLAMA_SERVER, llama_server_command),
                (LLAMA_SERVER_NGRAM, llama_server_ngram_command),
            ):
                if name in wanted:
                    port = free_port()
                    clients[name] = OpenAIClient(
                        peer(name, command(binary, port, model_path, threads, args.parallel), port, "/health")
                    )
        for name, command in (
            (LLAMA_CPP_PYTHON, lambda port: peer_command(port, model_path, threads)),
            (LOOKUP_PEER, lambda port: lookup_peer_command(port, model_path, threads)),
            (ISSUE_PEER, lambda port: issue_peer_command(port, model_path)),
        ):
            if name in wanted:
                port = free_port()
                clients[name] = OpenAIClient(peer(name, command(port), port))
        for server in servers.values():
            server.wait_ready()
        measured = {name: client for name, client in clients.items() if name in wanted}
        load = ForeignLoad([os.getpid()] + [server.pid for server in servers.values()], knows_servers=True)
        # llama-cpp-python's side targets serve one request at a time (its prompt lookup) or interrupt
        # a running request for a new one (its defaults): one stream.
        one_stream = {name: [1] for name in (LOOKUP_PEER, ISSUE_PEER)}
        results = await measure(
            measured,
            load,
            args,
            only_levels={**one_stream, NO_CACHE: []},
            chat_with=[n for n in ("chatrpc REST", "chatrpc gRPC", NO_CACHE, LLAMA_CPP_PYTHON) if n in measured],
        )
        if args.overhead_pairs:
            results["rest_overhead"] = await rest_overhead(
                rest_url, clients["chatrpc gRPC"], clients["chatrpc REST"], args.overhead_pairs, load, args
            )
        return results
    finally:
        for client in clients.values():
            await client.close()
        for server in servers.values():
            server.stop()
        print(f"server logs: {log_dir}", file=sys.stderr)


async def run_rest_overhead(args: argparse.Namespace) -> dict:
    """Only the REST overhead, against a chatrpc started for it (a minute instead of --compare's 12)."""
    log_dir = Path(tempfile.mkdtemp(prefix="chatrpc-serving-"))
    grpc_port, rest_port = free_port(), free_port()
    server = start(
        "chatrpc", chatrpc_command(grpc_port, rest_port, args.parallel), f"http://127.0.0.1:{rest_port}/health", log_dir
    )
    rest, grpc_client = OpenAIClient(f"http://127.0.0.1:{rest_port}/v1"), GrpcClient(f"127.0.0.1:{grpc_port}")
    try:
        server.wait_ready()
        load = ForeignLoad([os.getpid(), server.pid], knows_servers=True)
        overhead = await rest_overhead(
            f"http://127.0.0.1:{rest_port}/v1", grpc_client, rest, args.overhead_pairs, load, args
        )
        return {"levels": {}, "chats": {}, "rest_overhead": overhead}
    finally:
        await rest.close()
        await grpc_client.close()
        server.stop()
        print(f"server logs: {log_dir}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description="streaming chat completion load generator (loopback only)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--openai-url", help="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    target.add_argument("--grpc", help="chatrpc's gRPC target, e.g. 127.0.0.1:50051")
    target.add_argument(
        "--compare", action="store_true", help="start chatrpc and llama-cpp-python's server, measure both"
    )
    target.add_argument("--rest-overhead", action="store_true", help="start chatrpc and measure only the REST overhead")
    parser.add_argument(
        "--levels",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(LEVELS),
        help="concurrency levels (default: 1,4,8,16)",
    )
    parser.add_argument(
        "--requests", type=int, default=0, help=f"requests per level (default, level: requests: {DEFAULT_REQUESTS})"
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the tables show medians (default: 2)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default: 128)")
    parser.add_argument("--turns", type=int, default=6, help="turns of the multi-turn chat, 0 for none (default: 6)")
    parser.add_argument("--chat-repeats", type=int, default=1, help="chats per target and pause (default: 1)")
    parser.add_argument(
        "--pauses",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.0, 2.0],
        help="seconds between an answer and the next turn, one chat series each (default: 0,2)",
    )
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=0.1,
        help="before a level, wait until other processes use less than this share of the CPUs, "
        "and measure it again if they used more during it (default: 0.1)",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=60, help="wait no longer than this, in seconds (default: 60)"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measurements of a level or chat again when others loaded the machine (default: 2)",
    )
    parser.add_argument("--cap", type=float, default=120, help="seconds a level may start requests (default: 120)")
    parser.add_argument(
        "--parallel", type=int, default=8, help="chatrpc's --parallel and llama-server's in --compare (default: 8)"
    )
    parser.add_argument(
        "--target",
        dest="targets",
        action="append",
        choices=COMPARE_TARGETS,
        help="--compare: only this target; repeat for several (default: all)",
    )
    parser.add_argument(
        "--overhead-pairs",
        type=int,
        default=300,
        help="rounds of the REST overhead in --compare and --rest-overhead (default: 300)",
    )
    parser.add_argument("--model", default=MODEL_ID, help=f"model id to request (default: {MODEL_ID})")
    parser.add_argument("--api-key", help="bearer key, if the server wants one")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()

    started = time.monotonic()
    runner = run_compare if args.compare else run_rest_overhead if args.rest_overhead else run_single
    results = asyncio.run(runner(args))

    print(f"\n{machine()}; {args.max_tokens} tokens per request, {args.repeats} rounds, medians\n")
    if results["levels"]:
        print("\n".join(level_table(results["levels"])))
    if any(results["chats"].values()):
        print(f"\nMulti-turn chat, {args.turns} turns, the whole history resent each turn (median TTFT):\n")
        print("\n".join(chat_table(results["chats"])))
    if results["levels"]:
        print("\n" + "\n".join(ratio_lines(results)))
    if "rest_overhead" in results:
        o = results["rest_overhead"]
        print(
            f"\nREST overhead, one-token streaming requests, {o['pairs']} rounds interleaved "
            f"(other load {o['foreign_load']:.0%}):\n"
        )
        print("| REST client | REST p50 ms | gRPC p50 ms | p50 difference ms | median of per-round differences ms |")
        print("|---|---:|---:|---:|---:|")
        for label, suffix in (("raw HTTP/1.1 (httptools)", ""), ("aiohttp", "_aiohttp"), ("httpx", "_httpx")):
            print(
                f"| {label} | {o[f'rest{suffix}_p50'] * 1e3:.1f} | {o['grpc_p50'] * 1e3:.1f} | "
                f"{o[f'overhead{suffix}_p50'] * 1e3:+.2f} | {o[f'overhead{suffix}_paired'] * 1e3:+.2f} |"
            )
    print(f"\n(run took {time.monotonic() - started:.0f} s)")
    if args.json:
        levels = {
            name: {level: [asdict(r) for r in runs] for level, runs in by_level.items()}
            for name, by_level in results["levels"].items()
        }
        record = {**results, "levels": levels, "machine": machine(), "argv": sys.argv}
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
